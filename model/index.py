"""``ItemIndex``: the catalog as an ``nn.Module`` of registered buffers.

Every tensor of the index is a buffer (DESIGN §3), so ``state_dict``, device
moves and the artifact all see the whole index. Search is probe-then-filter:
pick ``nprobe`` lists per query, Bloom-test the request's filter only on the
items of those lists while scanning them, keep a partial top-k per list,
merge, then re-check the survivors against the exact attribute store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sterling.kernels import (
    bloom_term_hits,
    cpu_scan,
    exact_term_hits,
    ivf_topk,
    probe_lists,
)
from sterling.kernels.bits import unpack_bits_range
from sterling.kernels.filter_eval import OP_NOT, FilterPlan
from sterling.kernels.ivf import ListStats, ScanFilter, ids_of_positions, order_results
from sterling.model import bloom as bloom_mod
from sterling.model.artifact import read_artifact, write_artifact
from sterling.model.config import MAX_ABS_VALUE, IndexConfig, Metric
from sterling.model.errors import (
    ArtifactError,
    DimensionMismatchError,
    InvalidInputError,
    LimitExceededError,
    NonFiniteError,
)
from sterling.model.filter import CompiledFilters, check_program_terms, compile_filters
from sterling.model.stages import stage, staged

__all__ = ["ItemIndex", "prepare_queries"]
# Blocks at least this long evaluate only the programs their queries need (see _eligible_fn).
_PER_PROGRAM_MIN_ITEMS = 2048

_BUFFERS = (
    "centroids",
    "list_offsets",
    "codes",
    "scales",
    "item_ids",
    "bloom",
    "attr_ids",
    "attr_offsets",
    "alive",
    "version",
)
_SMALL_BATCH = 32  # unfiltered CPU batches up to this size take the lean path

# Scores one search chunk may hold (fp32: 256 MiB); bounds memory at any B, nprobe and k.
_CHUNK_BUDGET = 1 << 26


def prepare_queries(xq, dim: int, metric: Metric) -> torch.Tensor:
    """Validate and convert queries to fp32 [B, D] (normalised for cosine)."""
    if isinstance(xq, np.ndarray):
        xq = torch.from_numpy(xq)
    if not isinstance(xq, torch.Tensor):
        try:
            xq = torch.as_tensor(xq, dtype=torch.float32)
        except (TypeError, ValueError) as e:
            raise InvalidInputError(f"queries must be a float array [B, {dim}], got {type(xq).__name__}") from e
    if xq.ndim == 1:
        xq = xq[None, :]
    if xq.ndim != 2:
        raise DimensionMismatchError(f"queries must be [B, {dim}], got shape {tuple(xq.shape)}")
    if xq.shape[1] != dim:
        raise DimensionMismatchError(
            f"queries have dimension {xq.shape[1]} but the index was built with dimension {dim}; "
            "encode queries with the same model as the items"
        )
    if not xq.is_floating_point():
        raise InvalidInputError(f"queries must be floating point, got {xq.dtype}")
    xq = xq.detach().float()
    amax = np.abs(xq.numpy()).max(initial=0.0) if xq.device.type == "cpu" else xq.abs().amax()
    if not bool(amax <= MAX_ABS_VALUE):  # one pass catches NaN, inf and values that overflow fp32 scores
        if not bool(torch.isfinite(xq).all()):
            bad = int((~torch.isfinite(xq).all(dim=1)).nonzero()[0])
            raise NonFiniteError(f"query row {bad} contains NaN or inf; replace or drop it before searching")
        bad = int((xq.abs() > MAX_ABS_VALUE).any(dim=1).nonzero()[0])
        raise LimitExceededError(
            f"query row {bad} holds |value| {float(xq[bad].abs().max()):.3g} above {MAX_ABS_VALUE:.0e}, where "
            "fp32 scores overflow to inf; rescale the embeddings", name="abs value", value=int(min(amax, 2**62)),
            limit=int(MAX_ABS_VALUE))
    if Metric(metric) is Metric.COSINE:
        xq = F.normalize(xq, dim=1)
    return xq


class ItemIndex(nn.Module):
    """IVF int8 item index with Bloom eligibility and an exact attribute store.

    Build with ``sterling.model.build_index``; do not call the constructor
    with hand-made tensors unless you know the layout (DESIGN §3).

    Example:
        >>> index = build_index(xb, attributes=attrs, config=IndexConfig(nlist=256))
        >>> scores, ids = index.search(xq, k=10, nprobe=32, where="lang:en AND NOT policy:blocked")
    """

    centroids: torch.Tensor  # [nlist, D] fp32, unit norm
    list_offsets: torch.Tensor  # [nlist + 1] int64
    codes: torch.Tensor  # [N_cap, D] int8
    scales: torch.Tensor  # [N_cap] fp32
    item_ids: torch.Tensor  # [N_cap] int64, −1 = empty slot
    bloom: torch.Tensor  # [N_cap, W] int64 item-major Bloom words
    attr_ids: torch.Tensor  # [nnz] int32
    attr_offsets: torch.Tensor  # [N_cap + 1] int64
    alive: torch.Tensor  # [ceil(N_cap / 8)] uint8 bitmask
    version: torch.Tensor  # [] int64

    def __init__(
        self,
        *,
        config: IndexConfig,
        vocab: list[str],
        bloom_spec: bloom_mod.BloomSpec,
        tensors: dict[str, torch.Tensor],
    ) -> None:
        super().__init__()
        missing = [b for b in _BUFFERS if b not in tensors]
        if missing:
            raise ArtifactError(f"index tensors missing: {missing}")
        for name in _BUFFERS:
            self.register_buffer(name, tensors[name])
        self.config = config
        self.vocab = list(vocab)
        self.vocab_index = {t: i for i, t in enumerate(self.vocab)}
        self.bloom_spec = bloom_spec

    # ---------------------------------------------------------------- shape
    @property
    def dim(self) -> int:
        return int(self.codes.shape[1])

    @property
    def nlist(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def capacity(self) -> int:
        return int(self.codes.shape[0])

    @property
    def num_items(self) -> int:
        return int((self.item_ids >= 0).sum())

    @property
    def metric(self) -> Metric:
        return Metric(self.config.metric)

    def default_nprobe(self) -> int:
        return self.config.nprobe or max(1, self.nlist // 8)

    # --------------------------------------------------------------- search
    def compile_filters(self, where, batch: int) -> CompiledFilters:
        """Compile the batch's filters; limits of the backend that will scan them are checked here."""
        filters = compile_filters(
            where,
            batch,
            vocab_index=self.vocab_index,
            term_words_fn=lambda terms: bloom_mod.term_words(terms, self.bloom_spec),
            max_terms=self.config.max_filter_terms,
        )
        if self.codes.device.type == "cuda":
            from sterling.kernels.triton_ivf import MAX_PROGRAM_TERMS

            check_program_terms(filters, MAX_PROGRAM_TERMS, backend="GPU (Triton)")
        return filters

    def _check_k_nprobe(self, k, nprobe) -> tuple[int, int]:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidInputError(f"k ({k!r}) must be an integer ≥ 1")
        if k > self.config.max_k:
            raise LimitExceededError(
                f"k ({k}) is above max_k ({self.config.max_k}); ask for fewer results, or raise the limit "
                "(IndexConfig.max_k / index.config.max_k, `sterling query --max-k`)",
                name="k", value=int(k), limit=self.config.max_k,
            )
        if nprobe is None:
            nprobe = self.default_nprobe()
        if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= self.nlist:
            raise InvalidInputError(
                f"nprobe ({nprobe!r}) must be an integer in 1..nlist ({self.nlist}); "
                f"nlist/8 = {max(1, self.nlist // 8)} is a good start"
            )
        return int(k), int(nprobe)

    def search(
        self,
        xq,
        k: int = 10,
        nprobe: int | None = None,
        where: str | list[str | None] | None = None,
        exact: bool = True,
        adaptive: bool | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items per query, Faiss-like.

        Args:
            xq: [B, D] (or [D]) float queries.
            k: results per query. More than the probed lists hold is fine:
                the rest is padded.
            nprobe: lists probed per query, 1..nlist (default nlist // 8).
            where: filter expression for every query, or one per query
                (``None``/"" = no filter). See ``sterling.model.filter``.
            exact: re-check survivors against the exact attributes, so no
                ineligible item is returned. With ``exact=False`` monotone
                expressions (AND/OR) are answered from the Bloom pass alone
                (rare false positives possible); expressions with NOT are
                always checked exactly.
            adaptive: widen the probe for selective filters (default:
                ``config.adaptive_filter``). A document shard must pass
                ``False`` when its answer has to merge into exactly the
                answer of a fixed-``nprobe`` search.
        Returns:
            (scores [B, k] fp32, ids [B, k] int64); missing results are
            −inf / −1. Within equal scores, lower index position first.
        """
        if torch.compiler.is_compiling():  # data-dependent loops: a compiled model calls it eagerly
            return self._search_eager(xq, k, nprobe, where, exact, adaptive)
        return self._search(xq, k, nprobe, where, exact, adaptive)

    @torch.compiler.disable
    def _search_eager(self, *args):
        return self._search(*args)

    def _search(self, xq, k, nprobe, where, exact, adaptive):
        # (no torch.no_grad(): its context costs more than a small search; the queries are
        # detached and every buffer is a constant, so no autograd graph is recorded)
        xq = prepare_queries(xq, self.dim, self.metric)
        k, nprobe = self._check_k_nprobe(k, nprobe)
        dev = self.codes.device
        if xq.device != dev:  # queries go to the index, results come back on the index's device
            xq = xq.to(dev)
        B = xq.shape[0]
        unfiltered = where is None or (isinstance(where, str) and not where.strip())
        filters = None
        if not unfiltered:
            with stage("filter"):
                filters = self.compile_filters(where, B)
        qprog_all = None if filters is None else filters.query_program.to(dev)
        adaptive = self.config.adaptive_filter if adaptive is None else adaptive
        avg = max(1, self.capacity // max(self.nlist, 1))
        scanned = nprobe * avg
        per_query = scanned + min(16 * k, scanned + 16 * nprobe)  # probed scores + selected candidates
        step = max(1, min(B, _CHUNK_BUDGET // max(per_query, 1)))
        if filters is None and B <= _SMALL_BATCH and step >= B:
            fast = self._small_batch_cpu(xq, k, nprobe)
            if fast is not None:
                return fast

        def chunk(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
            if filters is None:  # the scan maps positions to ids itself (sequential reads)
                with stage("probe"):
                    probe = probe_lists(xq[rows], self.centroids, nprobe)
                with stage("scan"):
                    s, _, ids = ivf_topk(xq[rows], probe, k=k, item_ids=self.item_ids, **self._scan_args())
                return s, ids
            s, p = self._search_chunk(xq[rows], k, nprobe, filters, qprog_all[rows], exact, adaptive)
            return s, self.positions_to_ids(p)

        if step >= B:  # one chunk (the common case): no copies
            return chunk(slice(0, B))
        out_s = torch.empty(B, k, device=dev)
        out_i = torch.empty(B, k, dtype=torch.int64, device=dev)
        for s in range(0, B, step):
            rows = slice(s, s + step)
            out_s[rows], out_i[rows] = chunk(rows)
        return out_s, out_i

    def _small_batch_cpu(self, xq: torch.Tensor, k: int, nprobe: int):
        """Unfiltered small batches on CPU: numpy probe + one compiled call, nothing else.

        At batch 1 a search is ~0.5 ms of scan; a dozen PyTorch ops around it
        would add a fifth. Same results contract as the general path (the
        probe set can differ from ``probe_lists`` only at exact centroid-score
        ties). Returns None when the fused scan cannot run here.
        """
        views = self._numpy_views()
        if views is None or xq.device.type != "cpu":
            return None
        x = np.ascontiguousarray(xq.numpy())
        with stage("probe"):
            coarse = x @ views["centroids_t"]
            nl = coarse.shape[1]
            probe = np.argpartition(-coarse, nprobe - 1, axis=1)[:, :nprobe] if nprobe < nl else \
                np.broadcast_to(np.arange(nl), coarse.shape).copy()
        with stage("scan"):
            s, _, _, ids = cpu_scan.fused_topk(
                x, np.ascontiguousarray(probe, dtype=np.int64), views["codes"], views["scales"], views["list_offsets"],
                views["alive"], k, item_ids=views["item_ids"],
            )
        return torch.from_numpy(s), torch.from_numpy(ids)

    def _numpy_views(self) -> dict | None:
        """numpy views of the CPU buffers the fused scan reads (cached while the buffers stay)."""
        if not cpu_scan.HAVE_NUMBA or self.codes.device.type != "cpu" or self.capacity >= 1 << 32:
            return None
        names = ("codes", "scales", "list_offsets", "alive", "item_ids", "centroids")

        def build(*tensors):
            views = {n: t.numpy() for n, t in zip(names, tensors)}
            views["centroids_t"] = np.ascontiguousarray(views.pop("centroids").T)
            return views

        return self._cached("numpy_views", [getattr(self, n) for n in names], build)

    def _cached(self, name: str, tensors: list[torch.Tensor], build):
        """``build(*tensors)``, recomputed only when one of the tensors is replaced or edited in place."""
        key = tuple((t.data_ptr(), t.numel(), str(t.device), t._version) for t in tensors)
        hit = self.__dict__.get("_cache_" + name)
        if hit is None or hit[0] != key:
            hit = (key, build(*tensors))
            self.__dict__["_cache_" + name] = hit
        return hit[1]

    def positions_to_ids(self, pos: torch.Tensor) -> torch.Tensor:
        """Index positions → item ids; −1 stays −1."""
        if pos.device.type == "cpu" and self.item_ids.device.type == "cpu":
            p = pos.numpy()
            ids = self.item_ids.numpy()[np.maximum(p, 0)]
            ids[p < 0] = -1
            return torch.from_numpy(ids)
        return ids_of_positions(pos, self.item_ids)

    def _eligible_fn(self, filters: CompiledFilters, qprog: torch.Tensor, seen: torch.Tensor | None = None):
        """Bloom pass over one list block, for the queries scanning it.

        ``seen`` [b, 2] (optional) accumulates, per query, the live items
        scanned and how many of them passed the Bloom pass.
        """

        def _bloom_block(filters: CompiledFilters, start: int, end: int, progs: torch.Tensor) -> torch.Tensor:
            """[len(progs), n] Bloom pass of the given programs (−1 = unfiltered) over one block.

            Each (block, program) row is computed once per batch and cached, so rescans
            reuse it. A block is usually probed by a few of the batch's queries: when it
            is large and needs few of the P programs, each is evaluated alone (its own
            small plan); otherwise the whole batch plan runs once (fewer, larger ops).
            """
            cache = filters._plans.setdefault("blocks", {})
            rows = cache.setdefault((start, end), {})
            want = [p for p in progs.unique().tolist() if p >= 0 and p not in rows]
            if want:
                P = len(filters.programs)
                sig = self.bloom[start:end]
                if 4 * len(want) >= P or end - start < _PER_PROGRAM_MIN_ITEMS:
                    plan = filters.plan(bloom=True)
                    ev = plan.eval(bloom_term_hits(sig, filters.term_words[plan.terms].to(sig.device)))
                    new = {p: ev[p] for p in range(P)}
                else:
                    new = {}
                    for p in want:
                        plan = filters._plans.get(("one", p))
                        if plan is None:
                            plan = filters._plans[("one", p)] = FilterPlan.build([filters.programs[p]], bloom=True)
                        new[p] = plan.eval(bloom_term_hits(sig, filters.term_words[plan.terms].to(sig.device)))[0]
                used = filters._plans.get("block_bytes", 0) + (end - start) * len(new)
                if used <= 1 << 26:  # cache at most 64 MB of Bloom results per batch
                    rows.update(new)
                    filters._plans["block_bytes"] = used
                lookup = {**rows, **new}
            else:
                lookup = rows
            ones = torch.ones(end - start, dtype=torch.bool, device=self.bloom.device)
            return torch.stack([lookup[p] if p >= 0 else ones for p in progs.tolist()])

        @staged("filter")
        def eligible(rows: torch.Tensor, start: int, end: int) -> torch.Tensor | None:
            progs = qprog[rows]
            if bool((progs < 0).all()):
                return None
            elig = _bloom_block(filters, start, end, progs)
            if seen is not None:
                live = unpack_bits_range(self.alive, start, end)
                seen[rows, 0] += int(live.sum())
                seen[rows, 1] += (elig & live).sum(1)
            return elig

        return eligible

    @staged("filter")
    def verify(self, positions: torch.Tensor, qprog: torch.Tensor, filters: CompiledFilters) -> torch.Tensor:
        """Exact filter check: positions [b, K] with program per row [b] → bool [b, K].

        Unfiltered rows pass every valid position; −1 positions never pass.
        """
        b, K = positions.shape
        flat = positions.reshape(-1)
        fprog = qprog.repeat_interleave(K)
        ok = flat >= 0
        need = (ok & (fprog >= 0)).nonzero().squeeze(1)
        if need.numel():
            plan = filters.plan(bloom=False)
            term_vocab = filters.term_vocab[plan.terms].to(flat.device)
            hits = exact_term_hits(self.attr_ids, self.attr_offsets, flat[need], term_vocab)
            ev = plan.eval(hits)  # [P, M]
            ok[need] = ev[fprog[need], torch.arange(need.numel(), device=flat.device)]
        return ok.reshape(b, K)

    def _search_chunk(self, xq, k, nprobe, filters, qprog, exact, adaptive):
        """Search one chunk of queries.

        Filtered queries adapt to their filter's selectivity f, measured as
        the Bloom-eligible fraction of the items their first scan touched
        (times the exact precision of its survivors): the eligible top-k
        lie in a wider ball, and about nprobe / √f lists hold it (the ball
        grows sublinearly in lists; nprobe / f overshoots). A query that
        needs more than it scanned is rescanned with that many lists;
        one that would need more than half of all lists skips IVF and scores
        its exactly verified eligible set directly (pre-filtering). Turn
        this off with ``adaptive=False``.
        """
        with stage("probe"):
            probe = probe_lists(xq, self.centroids, nprobe)
        if filters is None:
            return ivf_topk(xq, probe, k=k, eligible=None, **self._scan_args())
        filtered = qprog >= 0
        if not bool(filtered.any()):
            return ivf_topk(xq, probe, k=k, eligible=None, **self._scan_args())
        dev = xq.device
        has_not = torch.tensor([any(op == OP_NOT for op, _ in p) for p in filters.programs] + [False]).to(dev)
        must_verify = filtered & (exact | has_not[qprog])
        # per query: live items scanned, Bloom survivors, candidates checked, passed
        seen = torch.zeros(xq.shape[0], 4, dtype=torch.int64, device=dev)
        seen[:, 2:] = 1
        out_s, out_p = self._scan_verified(xq, probe, k, filters, qprog, must_verify, seen)
        if not adaptive:
            return out_s, out_p
        precision = seen[:, 3].double() / seen[:, 2].double()
        frac = seen[:, 1].double() / seen[:, 0].clamp(min=1).double() * precision
        need = torch.where(filtered, nprobe / frac.clamp(min=1e-12).sqrt(), torch.zeros_like(frac))
        brute = filtered & (need >= 0.5 * self.nlist)
        widen = filtered & ~brute & (need > 1.25 * nprobe)
        if bool(widen.any()):
            rows = widen.nonzero().squeeze(1)
            # half-steps of nprobe, so each rescan is one batch and the overshoot stays small
            wide = torch.clamp(torch.ceil(2 * need[rows] / nprobe) * nprobe / 2, max=self.nlist).long()
            for w in wide.unique().tolist():
                sel = rows[wide == w]
                with stage("probe"):
                    p2 = probe_lists(xq[sel], self.centroids, int(w))
                out_s[sel], out_p[sel] = self._scan_verified(xq[sel], p2, k, filters, qprog[sel], must_verify[sel], None)
        if bool(brute.any()):
            rows = brute.nonzero().squeeze(1)
            for prog in qprog[rows].unique().tolist():
                sel = rows[qprog[rows] == prog]
                verify = bool(must_verify[sel].any())
                out_s[sel], out_p[sel] = self._prefilter_topk(xq[sel], k, filters, prog, verify=verify)
        return out_s, out_p

    def _scan_filter(self, filters: CompiledFilters, qprog: torch.Tensor) -> ScanFilter:
        return ScanFilter(self.bloom, filters.term_words, filters.programs, qprog)

    def _scan_args(self) -> dict:
        args = dict(codes=self.codes, scales=self.scales, list_offsets=self.list_offsets, alive=self.alive)
        if self.codes.device.type == "cuda":
            args["list_stats"] = self._list_stats()
        return args

    def _list_stats(self) -> ListStats:
        """Host-side list sizes for the GPU path, read back once per list layout."""
        return self._cached("list_stats", [self.list_offsets], ListStats.of)

    def _fused_exact(self, xq: torch.Tensor, filters: CompiledFilters) -> bool:
        """Whether the compiled CPU scan can take this batch's filter, exact checks included."""
        return (
            cpu_scan.HAVE_NUMBA
            and xq.device.type == "cpu"
            and self.codes.device.type == "cpu"
            and self.capacity < 1 << 31
            and filters.term_words.shape[0] <= cpu_scan.MAX_TERMS
        )

    @staged("scan")
    def _scan_verified(self, xq, probe, k, filters, qprog, must_verify, seen):
        """IVF scan with the Bloom pass; exact check of the survivors where required.

        Scans a margin beyond k, verifies, and rescans with a larger margin
        the rare queries whose verified survivors fall short of k while the
        scan had more candidates.
        """
        scan = self._scan_args()
        if self._fused_exact(xq, filters):
            # the compiled scan checks these programs exactly: its results are final
            prog_exact = torch.zeros(len(filters.programs), dtype=torch.bool)
            rows = must_verify & (qprog >= 0)
            prog_exact[qprog[rows]] = True
            sf = ScanFilter(self.bloom, filters.term_words, filters.programs, qprog, exact=prog_exact,
                            attr_ids=self.attr_ids, attr_offsets=self.attr_offsets, term_vocab=filters.term_vocab)
            counts = torch.zeros(xq.shape[0], 2, dtype=torch.int64)
            s, p = ivf_topk(xq, probe, k=k, scan_filter=sf, counts=counts, fused=True, **scan)
            if seen is not None:
                seen[:, :2] += counts
            return s, p
        if not bool(must_verify.any()):
            counts = None if seen is None else seen[:, :2]
            return ivf_topk(
                xq, probe, k=k, eligible=self._eligible_fn(filters, qprog, counts),
                scan_filter=self._scan_filter(filters, qprog), counts=counts, **scan,
            )
        b, dev = xq.shape[0], xq.device
        out_s = torch.full((b, k), float("-inf"), device=dev)
        out_p = torch.full((b, k), -1, dtype=torch.int64, device=dev)
        pending = torch.arange(b, device=dev)
        k_scan = k + max(16, k // 8)
        first = True
        while pending.numel():
            sub_prog = qprog[pending]
            counts = (torch.zeros(pending.numel(), 2, dtype=torch.int64, device=dev)
                      if first and seen is not None else None)
            elig = self._eligible_fn(filters, sub_prog, counts)
            s, p = ivf_topk(
                xq[pending], probe[pending], k=k_scan, eligible=elig,
                scan_filter=self._scan_filter(filters, sub_prog), counts=counts, **scan,
            )
            if counts is not None:
                seen[pending, :2] += counts
            verify_prog = torch.where(must_verify[pending], sub_prog, torch.full_like(sub_prog, -1))
            ok = self.verify(p, verify_prog, filters)
            if counts is not None:
                # precision of the Bloom survivors, for the selectivity estimate
                seen[pending, 2] += (p >= 0).sum(1)
                seen[pending, 3] += ok.sum(1)
            exhausted = torch.isneginf(s[:, -1])
            s2, p2 = order_results(s.masked_fill(~ok, float("-inf")), p.masked_fill(~ok, -1))
            done = (ok.sum(1) >= k) | exhausted
            idx = pending[done]
            out_s[idx], out_p[idx] = s2[done, :k], p2[done, :k]
            pending = pending[~done]
            k_scan *= 4
            first = False
        return out_s, out_p

    @staged("filter")
    def _prefilter_topk(self, xq, k, filters, prog: int, *, verify: bool):
        """Exact top-k over the whole eligible set: Bloom pass over every item, exact check, score."""
        cand = []
        step = 1 << 20
        plan = FilterPlan.build([filters.programs[prog]], bloom=True)
        words = filters.term_words[plan.terms].to(self.bloom.device)
        for start in range(0, self.capacity, step):
            end = min(start + step, self.capacity)
            ok = plan.eval(bloom_term_hits(self.bloom[start:end], words))[0]
            ok &= unpack_bits_range(self.alive, start, end)
            cand.append(ok.nonzero().squeeze(1) + start)
        pos = torch.cat(cand)
        if verify and pos.numel():
            keep = self.verify(pos[None, :], torch.full((1,), prog, dtype=torch.int64, device=pos.device), filters)[0]
            pos = pos[keep]
        b, dev = xq.shape[0], xq.device
        out_s = torch.full((b, k), float("-inf"), device=dev)
        out_p = torch.full((b, k), -1, dtype=torch.int64, device=dev)
        for s in range(0, pos.numel(), step):
            blk = pos[s : s + step]
            sc = (xq @ self.codes[blk].float().T) * self.scales[blk]
            both_s = torch.cat([out_s, sc], dim=1)
            both_p = torch.cat([out_p, blk.expand(b, -1)], dim=1)
            kk = min(k, both_s.shape[1])
            top_s, top_i = both_s.topk(kk, dim=1)
            out_s[:, :kk], out_p[:, :kk] = top_s, both_p.gather(1, top_i)
        return order_results(out_s, out_p)

    # ------------------------------------------------------------- artifact
    def meta(self) -> dict:
        return {
            "config": self.config.to_dict(),
            "vocab": self.vocab,
            "bloom": {"words": self.bloom_spec.words, "hashes": self.bloom_spec.hashes},
        }

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _BUFFERS}

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> ItemIndex:
        return cls(
            config=IndexConfig.from_dict(meta["config"]),
            vocab=meta["vocab"],
            bloom_spec=bloom_mod.BloomSpec(**meta["bloom"]),
            tensors=tensors,
        )

    def save(self, path: str | Path) -> None:
        """Write one atomic, checksummed artifact."""
        write_artifact(path, kind="item_index", meta={"index": self.meta()}, tensors=self.tensors())

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> ItemIndex:
        """Load an index artifact (or the index of a model artifact), memory-mapped."""
        h, tensors = read_artifact(path, verify=verify)
        if "index" not in h["meta"]:
            raise ArtifactError(f"{path} holds a {h['kind']!r}, which has no item index")
        prefix = "" if h["kind"] == "item_index" else "index."
        own = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
        return cls.from_parts(h["meta"]["index"], own)
