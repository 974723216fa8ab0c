"""Triton IVF scan for GPUs: int8 dot products, in-scan Bloom filter, two-stage top-k.

Stage A (``_block_max_kernel``), one program per (query, probed list, tile
of ``TILE`` items): int8 × int8 dot products with int32 accumulation (the
query is quantized per row, dp4a-style), the item's alive bit, and the
query's filter program tested on the tile's Bloom words — all in one pass
over the tile. It writes only the maximum of every 16-item block (and
per-pair counts of live / Bloom-eligible items for selectivity estimates).

Stage B (PyTorch, ``kernels.ivf.select_blocks``): top-k blocks per query.

Stage C (``_rescore_kernel``): recompute the exact scores of the selected
blocks only and mask them again, so no [B, items probed] score buffer is
ever materialized; a final top-k over 16·k candidates.

Filters reach the kernel as *truth tables*: each program's distinct terms
(at most ``MAX_PROGRAM_TERMS``) index the bits of a 2^T-entry table,
precomputed on the host with Bloom semantics (NOT = "maybe"), so any
AND/OR/NOT expression costs one table lookup per item.

Scores are ``(int32 dot) * query_scale * item_scale`` in fp32; the
reference (``ivf_topk_int8_reference``) computes the same integers with
PyTorch and is equal bit for bit. Note: quantizing queries to int8 makes
these scores differ slightly from the CPU path, which uses fp32 queries.

No stage synchronises with the host: the block layout (each pair's first
column) is a cumulative sum on the device, and the buffers and grid are
sized from host-side bounds (``kernels.ivf.ListStats``: the largest list,
and the blocks of the ``nprobe`` largest lists — no query can have more),
so a search can be captured in a CUDA graph once its filter tables exist.
"""

from __future__ import annotations

import torch

from sterling.kernels.bits import unpack_bits_range
from sterling.kernels.filter_eval import OP_TERM, eval_programs
from sterling.kernels.ivf import BLOCK, NEG_INF, _order_full, order_results, select_blocks

__all__ = [
    "HAVE_TRITON",
    "MAX_PROGRAM_TERMS",
    "TILE",
    "quantize_queries",
    "truth_tables",
    "ivf_topk_triton",
    "ivf_topk_int8_reference",
]

TILE = 64  # items per stage-A program (4 selection blocks)
MAX_PROGRAM_TERMS = 12  # truth table of 2^12 bits = 512 B per program


def quantize_queries(xq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, D] fp32 → (int8 [B, D], fp32 scale [B]) with ``xq ≈ codes * scale``."""
    from sterling.kernels.quant import quantize_int8

    return quantize_int8(xq)


def truth_tables(programs, term_words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per program: its terms (global term ids, −1 padded) and a 2^T-bit Bloom truth table.

    Returns (prog_terms [P, MAX_PROGRAM_TERMS] int32, tables [P, 2^MAX/32] int32).
    Raises ``ValueError`` for a program with more distinct terms than fit.
    """
    P = len(programs)
    size = 1 << MAX_PROGRAM_TERMS
    prog_terms = torch.full((max(P, 1), MAX_PROGRAM_TERMS), -1, dtype=torch.int32)
    tables = torch.zeros((max(P, 1), size // 32), dtype=torch.int32)
    for p, program in enumerate(programs):
        local: dict[int, int] = {}
        remapped = []
        for op, arg in program:
            if op == OP_TERM:
                arg = local.setdefault(arg, len(local))
            remapped.append((op, arg))
        if len(local) > MAX_PROGRAM_TERMS:
            raise ValueError(
                f"filter program has {len(local)} distinct terms; the GPU kernel handles up to "
                f"{MAX_PROGRAM_TERMS} (use the CPU path for larger expressions)"
            )
        for g, j in local.items():
            prog_terms[p, j] = g
        assign = torch.arange(size)
        hits = ((assign[None, :] >> torch.arange(max(len(local), 1))[:, None]) & 1).bool()
        table = eval_programs(hits, [remapped], bloom=True)[0]  # [size] bool
        words = (table.view(-1, 32).long() << torch.arange(32)).sum(1)
        tables[p] = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return prog_terms, tables


def _bloom_ok_reference(bloom, pos, term_words, prog_terms, tables, prog):
    """Per item: the program's truth-table lookup on its Bloom term hits (prog −1 → True)."""
    if prog < 0:
        return torch.ones(pos.numel(), dtype=torch.bool)
    idx = torch.zeros(pos.numel(), dtype=torch.int64)
    for j in range(MAX_PROGRAM_TERMS):
        t = int(prog_terms[prog, j])
        if t < 0:
            continue
        w = term_words[t]
        hit = ((bloom[pos] & w) == w).all(dim=1)
        idx |= hit.long() << j
    word = tables[prog][idx >> 5].long() & 0xFFFFFFFF
    return ((word >> (idx & 31)) & 1).bool()


def _filter_fields(scan_filter):
    """(bloom, term_words, programs, qprog) of a ``kernels.ivf.ScanFilter``, all None without one."""
    if scan_filter is None:
        return None, None, None, None
    sf = scan_filter
    return sf.bloom, sf.term_words, sf.programs, sf.qprog


def ivf_topk_int8_reference(xq, probe, codes, scales, list_offsets, alive, k, *, scan_filter=None):
    """Plain-PyTorch oracle of the Triton path: same int8 query codes, same integer dots.

    ``scan_filter`` (a ``kernels.ivf.ScanFilter``) is evaluated as a Bloom pass, as the kernel does.
    """
    bloom, term_words, programs, qprog = _filter_fields(scan_filter)
    qc, qs = quantize_queries(xq)
    B = xq.shape[0]
    if programs:
        prog_terms, tables = truth_tables(programs, term_words)
    out_s = torch.full((B, k), NEG_INF)
    out_p = torch.full((B, k), -1, dtype=torch.int64)
    offsets = list_offsets.tolist()
    for q in range(B):
        prog = -1 if qprog is None else int(qprog[q])
        ss, pp = [], []
        for lst in probe[q].tolist():
            s, e = offsets[lst], offsets[lst + 1]
            if e == s:
                continue
            pos = torch.arange(s, e)
            dot = (codes[s:e].to(torch.int32) * qc[q].to(torch.int32)).sum(1)
            sc = dot.float() * qs[q] * scales[s:e]
            ok = unpack_bits_range(alive, s, e)
            if prog >= 0:
                ok &= _bloom_ok_reference(bloom, pos, term_words, prog_terms, tables, prog)
            ss.append(sc[ok])
            pp.append(pos[ok])
        if ss:
            s_all, p_all = torch.cat(ss), torch.cat(pp)
            kk = min(k, s_all.numel())
            top, idx = s_all.topk(kk)
            out_s[q, :kk], out_p[q, :kk] = top, p_all[idx]
    return order_results(out_s, out_p)


try:  # Triton is optional: CPU-only installs use kernels.ivf
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover
    HAVE_TRITON = False

if HAVE_TRITON:

    @triton.jit
    def _item_ok(bloom_ptr, pos, valid, alive_ptr, prog, prog_terms_ptr, tables_ptr, tw_ptr,
                 W: tl.constexpr, NT: tl.constexpr, TBL_WORDS: tl.constexpr):
        alive_byte = tl.load(alive_ptr + (pos >> 3), mask=valid, other=0).to(tl.int32)
        ok = valid & (((alive_byte >> (pos & 7).to(tl.int32)) & 1) == 1)
        if prog >= 0:
            idx = tl.zeros(pos.shape, dtype=tl.int32)
            for j in tl.static_range(NT):
                t = tl.load(prog_terms_ptr + prog * NT + j)
                if t >= 0:
                    hit = valid
                    for w in tl.static_range(W):
                        tw = tl.load(tw_ptr + t * W + w)
                        bw = tl.load(bloom_ptr + pos * W + w, mask=valid, other=0)
                        hit = hit & ((bw & tw) == tw)
                    idx = idx | (hit.to(tl.int32) << j)
            word = tl.load(tables_ptr + prog * TBL_WORDS + (idx >> 5))
            ok = ok & (((word >> (idx & 31)) & 1) == 1)
        return ok

    @triton.jit
    def _block_max_kernel(
        qc_ptr, qs_ptr, codes_ptr, scales_ptr, offs_ptr, probe_ptr, col_ptr, alive_ptr,
        bloom_ptr, tw_ptr, prog_terms_ptr, tables_ptr, qprog_ptr, bmax_ptr, counts_ptr,
        nprobe, width,
        D: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr, W: tl.constexpr,
        NT: tl.constexpr, TBL_WORDS: tl.constexpr,
    ):
        p = tl.program_id(0)
        t = tl.program_id(1)
        q = p // nprobe
        lst = tl.load(probe_ptr + p)
        start = tl.load(offs_ptr + lst)
        end = tl.load(offs_ptr + lst + 1)
        first = start + t * TILE
        if first < end:
            i = tl.arange(0, TILE)
            pos = first + i
            valid = pos < end
            d = tl.arange(0, D)
            qv = tl.load(qc_ptr + q * D + d).to(tl.int32)  # [D]
            cv = tl.load(codes_ptr + pos[:, None] * D + d[None, :], mask=valid[:, None], other=0).to(tl.int32)
            acc = tl.sum(cv * qv[None, :], axis=1)  # [TILE] int32, exact
            sc = tl.load(scales_ptr + pos, mask=valid, other=0.0)
            score = acc.to(tl.float32) * tl.load(qs_ptr + q) * sc
            prog = tl.load(qprog_ptr + q)
            live = valid & (((tl.load(alive_ptr + (pos >> 3), mask=valid, other=0).to(tl.int32)
                              >> (pos & 7).to(tl.int32)) & 1) == 1)
            ok = _item_ok(bloom_ptr, pos, valid, alive_ptr, prog, prog_terms_ptr, tables_ptr, tw_ptr,
                          W, NT, TBL_WORDS)
            score = tl.where(ok, score, float("-inf"))
            bm = tl.max(tl.reshape(score, (TILE // BLOCK, BLOCK)), axis=1)  # [TILE // BLOCK]
            b = tl.arange(0, TILE // BLOCK)
            bstart = first + b * BLOCK
            c0 = tl.load(col_ptr + p)
            tl.store(bmax_ptr + q * width + c0 + t * (TILE // BLOCK) + b, bm, mask=bstart < end)
            tl.atomic_add(counts_ptr + p * 2, tl.sum(live.to(tl.int64), axis=0))
            tl.atomic_add(counts_ptr + p * 2 + 1, tl.sum(ok.to(tl.int64), axis=0))

    @triton.jit
    def _rescore_kernel(
        qc_ptr, qs_ptr, codes_ptr, scales_ptr, alive_ptr, bloom_ptr, tw_ptr, prog_terms_ptr,
        tables_ptr, qprog_ptr, bstart_ptr, bcount_ptr, out_s_ptr, out_p_ptr, kb,
        D: tl.constexpr, BLOCK: tl.constexpr, W: tl.constexpr, NT: tl.constexpr, TBL_WORDS: tl.constexpr,
    ):
        q = tl.program_id(0)
        j = tl.program_id(1)
        first = tl.load(bstart_ptr + q * kb + j)
        count = tl.load(bcount_ptr + q * kb + j)
        i = tl.arange(0, BLOCK)
        valid = i < count
        pos = first + i
        d = tl.arange(0, D)
        qv = tl.load(qc_ptr + q * D + d).to(tl.int32)
        cv = tl.load(codes_ptr + pos[:, None] * D + d[None, :], mask=valid[:, None], other=0).to(tl.int32)
        acc = tl.sum(cv * qv[None, :], axis=1)
        sc = tl.load(scales_ptr + pos, mask=valid, other=0.0)
        score = acc.to(tl.float32) * tl.load(qs_ptr + q) * sc
        prog = tl.load(qprog_ptr + q)
        ok = _item_ok(bloom_ptr, pos, valid, alive_ptr, prog, prog_terms_ptr, tables_ptr, tw_ptr,
                      W, NT, TBL_WORDS)
        score = tl.where(ok, score, float("-inf"))
        tl.store(out_s_ptr + (q * kb + j) * BLOCK + i, score)
        tl.store(out_p_ptr + (q * kb + j) * BLOCK + i, tl.where(ok, pos, -1))


def _to(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Host → device without a stream sync (pinned, non-blocking); no-op when already there."""
    if t.device == dev:
        return t
    if dev.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(dev, non_blocking=True)
    return t.to(dev)


def ivf_topk_triton(xq, probe, codes, scales, list_offsets, alive, k, *, scan_filter=None, counts=None,
                    list_stats=None):
    """Triton two-stage IVF top-k; same contract as ``kernels.ivf.ivf_topk``.

    Works on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1``.
    ``D`` must be a power of two (pad embeddings otherwise). With
    ``list_stats`` (``kernels.ivf.ListStats``) every buffer is sized from
    host-side bounds and the block layout is computed on the device, so the
    search issues no device→host sync (CUDA-graph friendly; the filter's
    truth tables are built on the host from the programs). Without it the
    list sizes are read back once. ``scan_filter`` (a ``kernels.ivf.ScanFilter``, its
    tensors on the queries' device) is a Bloom pass in the kernel, as in the reference.
    """
    bloom, term_words, programs, qprog = _filter_fields(scan_filter)
    if not HAVE_TRITON:
        raise RuntimeError("the Triton scan needs the `triton` package")
    from sterling.kernels.ivf import ListStats

    block_max, rescore = _block_max_kernel, _rescore_kernel
    dev = xq.device
    B, nprobe = probe.shape
    D = xq.shape[1]
    if D & (D - 1):
        raise ValueError(f"the Triton scan needs a power-of-two dimension, got D={D}")
    if list_stats is None:
        list_stats = ListStats.of(list_offsets)
    qc, qs = quantize_queries(xq)
    sizes = list_offsets[1:] - list_offsets[:-1]
    pair_nb = (sizes[probe.reshape(-1)] + BLOCK - 1) // BLOCK
    per_q = pair_nb.view(B, nprobe)
    col = (per_q.cumsum(1) - per_q).reshape(-1)  # first block column of each pair, on the device
    width = max(list_stats.max_width(nprobe), 1)  # columns past a query's own blocks stay −inf
    W = 1 if bloom is None else bloom.shape[1]
    if qprog is None or not programs:
        qprog = torch.full((B,), -1, dtype=torch.int64, device=dev)
        prog_terms, tables = truth_tables([], torch.zeros(0, W, dtype=torch.int64))
        term_words = torch.zeros(1, W, dtype=torch.int64, device=dev)
        bloom = torch.zeros(1, W, dtype=torch.int64, device=dev) if bloom is None else bloom
    else:
        prog_terms, tables = truth_tables(programs, term_words)
        if term_words.shape[0] == 0:
            term_words = torch.zeros(1, W, dtype=torch.int64)
    prog_terms, tables, term_words = _to(prog_terms, dev), _to(tables, dev), _to(term_words, dev)
    qprog = _to(qprog, dev)
    max_tiles = max(1, (list_stats.max_size + TILE - 1) // TILE)
    bmax = torch.full((B, width), NEG_INF, device=dev)
    pc = torch.zeros(B * nprobe, 2, dtype=torch.int64, device=dev)
    meta = dict(W=W, NT=prog_terms.shape[1], TBL_WORDS=tables.shape[1])
    block_max[(B * nprobe, max_tiles)](
        qc, qs, codes, scales, list_offsets, probe.reshape(-1).contiguous(), col, alive, bloom,
        term_words, prog_terms, tables, qprog, bmax, pc, nprobe, width,
        D=D, TILE=TILE, BLOCK=BLOCK, **meta,
    )
    if counts is not None:
        counts.index_add_(0, torch.arange(B, device=dev).repeat_interleave(nprobe), pc)
    top_bm, top_c = select_blocks(bmax, k)
    kb = top_c.shape[1]
    colq = col.view(B, nprobe)
    j = (torch.searchsorted(colq, top_c, right=True) - 1).clamp(min=0)
    pair_list = probe.reshape(-1)
    pair = torch.arange(B, device=dev)[:, None] * nprobe + j
    first = (top_c - colq.gather(1, j)) * BLOCK
    n_pair = sizes[pair_list[pair]]
    bcount = torch.where(torch.isneginf(top_bm), 0, (n_pair - first).clamp(0, BLOCK))
    bstart = list_offsets[:-1][pair_list[pair]] + first
    cand_s = torch.empty(B, kb * BLOCK, device=dev)
    cand_p = torch.empty(B, kb * BLOCK, dtype=torch.int64, device=dev)
    rescore[(B, kb)](
        qc, qs, codes, scales, alive, bloom, term_words, prog_terms, tables, qprog,
        bstart.contiguous(), bcount.contiguous(), cand_s, cand_p, kb,
        D=D, BLOCK=BLOCK, **meta,
    )
    kk = min(k, cand_s.shape[1])
    top_s, top_i = cand_s.topk(kk, dim=1)
    top_p = cand_p.gather(1, top_i)
    if kk < k:
        top_s = torch.cat([top_s, torch.full((B, k - kk), NEG_INF, device=dev)], dim=1)
        top_p = torch.cat([top_p, torch.full((B, k - kk), -1, dtype=torch.int64, device=dev)], dim=1)
    return _order_full(top_s, top_p)  # no data-dependent shortcut: it would read back
