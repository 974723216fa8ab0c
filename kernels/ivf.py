"""IVF int8 scan with per-list partial top-k (probe-then-filter).

Two implementations with one signature:

* ``ivf_topk_reference`` — per query, gather every item of its probed lists
  and score them. Slow and obviously right: the oracle for the fast paths.
* ``ivf_topk`` — the CPU path: the batch's (query, list) pairs are grouped by
  list, each list block is dequantized once and scored against all the
  queries that probe it with one GEMM, a partial top-k is kept per pair, and
  the partials are merged per query. Memory is bounded by the candidates
  (Σ min(k, |list|) per query), never by B × N.

Scores are ``scale_i * (xq · codes_i)`` in fp32. An item takes part when its
``alive`` bit is set and, if an ``eligible`` callback is given, the callback
marks it eligible for that query (the Bloom pass of the filter runs there, so
only items inside probed lists are ever filter-tested).

Ties: results are ordered by score descending, then item position ascending.
Which of several equal-scored items at the k-th place is kept is unspecified.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sterling.kernels.bits import unpack_bits_range

__all__ = ["probe_lists", "ivf_topk", "ivf_topk_reference", "order_results", "EligibleFn"]

# eligible(query_rows [c] int64, start, end) -> bool [c, end - start] or None (= all eligible)
EligibleFn = Callable[[torch.Tensor, int, int], "torch.Tensor | None"]

NEG_INF = float("-inf")


def probe_lists(xq: torch.Tensor, centroids: torch.Tensor, nprobe: int) -> torch.Tensor:
    """[B, D] queries × [nlist, D] centroids → [B, nprobe] list ids, best first."""
    coarse = xq @ centroids.T  # [B, nlist]
    return coarse.topk(nprobe, dim=1).indices


def order_results(scores: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort each row by (score desc, position asc); −inf rows get position −1."""
    key_pos = torch.where(pos < 0, torch.iinfo(torch.int64).max, pos)
    o = key_pos.argsort(dim=1, stable=True)
    scores, pos = scores.gather(1, o), pos.gather(1, o)
    o = scores.argsort(dim=1, descending=True, stable=True)
    scores, pos = scores.gather(1, o), pos.gather(1, o)
    pos = torch.where(torch.isneginf(scores), torch.full_like(pos, -1), pos)
    return scores, pos


def ivf_topk(
    xq: torch.Tensor,
    probe: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    list_offsets: torch.Tensor,
    alive: torch.Tensor,
    k: int,
    eligible: EligibleFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """List-grouped int8 IVF scan.

    Args:
        xq: [B, D] fp32 queries.
        probe: [B, nprobe] int64 list ids.
        codes: [N_cap, D] int8, cluster-contiguous.
        scales: [N_cap] fp32.
        list_offsets: [nlist + 1] int64 CSR over ``codes``.
        alive: uint8 bitmask over N_cap (see ``kernels.bits``).
        k: results per query.
        eligible: optional per-block filter (see module doc).
    Returns:
        (scores [B, k] fp32, positions [B, k] int64), −inf / −1 padded.
    """
    B, nprobe = probe.shape
    offsets = list_offsets.tolist()
    sizes = list_offsets[1:] - list_offsets[:-1]  # [nlist]

    pair_list = probe.reshape(-1)  # [B*nprobe], query-major
    pair_query = torch.arange(B).repeat_interleave(nprobe)
    seg_len = sizes[pair_list].clamp(max=k)  # candidates kept per pair
    seg_off = torch.zeros(B * nprobe + 1, dtype=torch.int64)
    torch.cumsum(seg_len, 0, out=seg_off[1:])
    total = int(seg_off[-1])
    cand_s = torch.full((total,), NEG_INF)
    cand_p = torch.full((total,), -1, dtype=torch.int64)

    order = torch.argsort(pair_list, stable=True)
    lists, counts = torch.unique_consecutive(pair_list[order], return_counts=True)
    ptr = 0
    for lst, cnt in zip(lists.tolist(), counts.tolist()):
        pairs = order[ptr : ptr + cnt]
        ptr += cnt
        start, end = offsets[lst], offsets[lst + 1]
        n = end - start
        if n == 0:
            continue
        rows = pair_query[pairs]
        block = codes[start:end].float()  # [n, D]
        sc = (xq[rows] @ block.T) * scales[start:end]  # [cnt, n]
        live = unpack_bits_range(alive, start, end)
        sc.masked_fill_(~live, NEG_INF)
        if eligible is not None:
            ok = eligible(rows, start, end)
            if ok is not None:
                sc.masked_fill_(~ok, NEG_INF)
        kk = min(k, n)
        if kk < n:
            top_s, top_i = sc.topk(kk, dim=1, sorted=False)
        else:
            top_s, top_i = sc, torch.arange(n).expand(cnt, n)
        dst = seg_off[pairs][:, None] + torch.arange(kk)
        cand_s[dst] = top_s
        cand_p[dst] = top_i + start

    # Merge: each query's candidates are contiguous in the buffer.
    q_off = seg_off[:: nprobe]  # [B + 1]
    q_len = q_off[1:] - q_off[:-1]
    width = max(int(q_len.max()) if B else 0, 1)
    col = torch.arange(width)
    src = q_off[:-1, None] + col  # [B, width]
    inside = col[None, :] < q_len[:, None]
    src = torch.where(inside, src, torch.zeros_like(src))
    mat_s = torch.where(inside, cand_s[src] if total else torch.full_like(src, 0, dtype=torch.float32), NEG_INF)
    mat_p = torch.where(inside, cand_p[src] if total else torch.full_like(src, -1), -1)
    kk = min(k, width)
    top_s, top_i = mat_s.topk(kk, dim=1)
    top_p = mat_p.gather(1, top_i)
    if kk < k:
        top_s = torch.cat([top_s, torch.full((B, k - kk), NEG_INF)], dim=1)
        top_p = torch.cat([top_p, torch.full((B, k - kk), -1, dtype=torch.int64)], dim=1)
    return order_results(top_s, top_p)


def ivf_topk_reference(
    xq: torch.Tensor,
    probe: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    list_offsets: torch.Tensor,
    alive: torch.Tensor,
    k: int,
    eligible: EligibleFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query gather-and-score; same signature and contract as ``ivf_topk``."""
    B = xq.shape[0]
    out_s = torch.full((B, k), NEG_INF)
    out_p = torch.full((B, k), -1, dtype=torch.int64)
    offsets = list_offsets.tolist()
    for q in range(B):
        parts_s, parts_p = [], []
        row = torch.tensor([q])
        for lst in probe[q].tolist():
            start, end = offsets[lst], offsets[lst + 1]
            if end == start:
                continue
            sc = (codes[start:end].float() @ xq[q]) * scales[start:end]
            keep = unpack_bits_range(alive, start, end)
            if eligible is not None:
                ok = eligible(row, start, end)
                if ok is not None:
                    keep = keep & ok[0]
            parts_s.append(sc[keep])
            parts_p.append(torch.arange(start, end)[keep])
        if not parts_s:
            continue
        s, p = torch.cat(parts_s), torch.cat(parts_p)
        kk = min(k, s.numel())
        top_s, top_i = s.topk(kk)
        out_s[q, :kk], out_p[q, :kk] = top_s, p[top_i]
    return order_results(out_s, out_p)
