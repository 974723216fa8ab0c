"""How one ``ItemIndex.search`` runs over the index's buffers.

``ItemIndex`` (``model/index.py``) owns the tensors and validates the
request; this module is the executor that turns a validated batch into
kernel calls:

1. **Chunking** — the batch is cut into chunks whose scanned scores fit
   ``CHUNK_BUDGET`` (memory bounded at any B, nprobe and k).
2. **Lean path** — an unfiltered CPU batch of at most ``SMALL_BATCH``
   queries is one numpy probe and one compiled call, nothing else.
3. **Filtered path** (``_search_chunk``) — probe, scan with the Bloom pass
   (on numba the scan checks the exact attributes itself), verify the
   survivors against the exact attribute store (``verify``), and refill the
   rare queries whose verified survivors fall short of k with a larger
   margin (``_scan_verified``).
4. **Adaptive sizing and widening** (``first_scan_plan``,
   ``widen_for_selectivity``) — a filtered query's first scan is sized
   from its filter's eligible fraction on the index's selectivity sample
   (``sterling.model.selectivity``); one whose measured selectivity then
   says its eligible top-k lies beyond the scanned lists scans the next
   lists by centroid rank (those ranked first..w; its top-k so far is
   merged in, ``merge_widened``), or, past half of all lists, is scored on
   its exactly verified eligible set directly (``_prefilter_topk``).

The filter reaches every backend as one ``kernels.ivf.ScanFilter``; the
batch's Bloom results per list block live in one ``BlockMasks`` made here,
so rescans reuse them. With ``stats=True`` the call also returns a
``SearchStats``; without it nothing is counted.

Example:
    >>> s, ids, st = index.search(xq, k=10, nprobe=32, where="lang:en", return_stats=True)
    >>> st.verified, st.rejected, st.nprobe_max
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np
import torch

from sterling.kernels import bloom_term_hits, cpu_scan, exact_term_hits, probe_lists
from sterling.kernels.bits import unpack_bits_range
from sterling.kernels.filter_eval import OP_NOT, FilterPlan
from sterling.kernels.ivf import BlockMasks, ScanFilter, order_results
from sterling.model.filter import CompiledFilters
from sterling.model.stages import stage, staged

__all__ = [
    "CHUNK_BUDGET",
    "SMALL_BATCH",
    "ScanBackend",
    "SearchStats",
    "Widening",
    "first_scan_plan",
    "measured_selectivity",
    "merge_widened",
    "run",
    "verify",
    "widen_for_selectivity",
]

SMALL_BATCH = 32  # unfiltered CPU batches up to this size take the lean path
# Scores one search chunk may hold (fp32: 256 MiB); bounds memory at any B, nprobe and k.
CHUNK_BUDGET = 1 << 26
PREFILTER_STEP = 1 << 20  # items per block of the pre-filtered exact scan


class ScanBackend(StrEnum):
    """Which scan served a search: ``cpu-lean`` (small unfiltered batch, one compiled call),
    ``cpu-fused`` (numba), ``cpu-torch`` (op by op; no numba, or a filter over 63 terms),
    ``cuda-triton``."""

    CPU_LEAN = "cpu-lean"
    CPU_FUSED = "cpu-fused"
    CPU_TORCH = "cpu-torch"
    CUDA_TRITON = "cuda-triton"


@dataclass(frozen=True, kw_only=True, slots=True)
class SearchStats:
    """What one ``ItemIndex.search`` did (``return_stats=True``).

    Attributes:
        queries: B.
        backend: the scan that served it.
        chunks: query chunks the batch was cut into (``CHUNK_BUDGET``).
        nprobe: nprobe asked.
        nprobe_used: [B] lists each query ended with: nprobe, the widened
            nprobe, or nlist for a query scored on its whole eligible set.
        lists_probed: (query, list) pairs scanned, first scans and widening
            scans (lists ranked nprobe..w; refills rescan the same pairs and
            are not counted here).
        items_scanned: live items in those pairs.
        verified: candidates checked against the exact attribute store
            (in the compiled scan, every Bloom survivor of a checked query).
        rejected: of those, the ones that failed: Bloom false positives
            (and items a NOT excludes, which the Bloom pass cannot decide).
        refills: query rescans with a larger margin after verification.
        widened: queries widened to more lists.
        widen_rounds: widening scans run (one per distinct widened nprobe).
        prefiltered: queries scored on their exactly verified eligible set.
        presized: filtered queries whose first scan was sized by the selectivity
            sample's estimate (more lists than nprobe, or the eligible set directly).
        selectivity_counts: [B, 4] int64, per query, of its first scan: live
            items scanned, of which passed the in-scan filter, candidates
            checked after the scan, of which passed (zeros for an unfiltered
            batch). Sums over document shards (each list lives in one) are the
            single index's counts: ``measured_selectivity`` reads them.
    """

    queries: int
    backend: ScanBackend
    chunks: int
    nprobe: int
    nprobe_used: tuple[int, ...]
    lists_probed: int
    items_scanned: int
    verified: int
    rejected: int
    refills: int
    widened: int
    widen_rounds: int
    prefiltered: int
    presized: int
    selectivity_counts: torch.Tensor

    @property
    def nprobe_max(self) -> int:
        return max(self.nprobe_used, default=0)

    @property
    def nprobe_mean(self) -> float:
        return sum(self.nprobe_used) / max(1, len(self.nprobe_used))


@dataclass(slots=True)
class _Tally:
    """Mutable counters behind ``SearchStats``; only made when stats are asked for."""

    nprobe: int
    nprobe_used: torch.Tensor  # [B] int64
    backend: ScanBackend
    rows: slice = field(default_factory=lambda: slice(0, 0))  # the chunk being searched
    chunks: int = 0
    lists_probed: int = 0
    items_scanned: int = 0
    verified: int = 0
    rejected: int = 0
    refills: int = 0
    widened: int = 0
    widen_rounds: int = 0
    prefiltered: int = 0
    presized: int = 0
    selectivity_counts: torch.Tensor | None = None  # [B, 4] int64

    def probed(self, index, probe) -> None:
        probe = torch.as_tensor(probe).cpu()
        self.lists_probed += probe.numel()
        self.items_scanned += int(index.live_per_list()[probe].sum())

    def set_nprobe(self, sel: torch.Tensor, value: int) -> None:
        self.nprobe_used[self.rows][sel.cpu()] = value

    def freeze(self, B: int) -> SearchStats:
        return SearchStats(
            queries=B, backend=self.backend, chunks=self.chunks, nprobe=self.nprobe,
            nprobe_used=tuple(self.nprobe_used.tolist()), lists_probed=self.lists_probed,
            items_scanned=self.items_scanned, verified=self.verified, rejected=self.rejected,
            refills=self.refills, widened=self.widened, widen_rounds=self.widen_rounds,
            prefiltered=self.prefiltered, presized=self.presized, selectivity_counts=self.selectivity_counts,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class Widening:
    """Per-query decision of ``widen_for_selectivity`` (all [B]).

    Attributes:
        need: float64 lists the eligible top-k is estimated to need (0 = unfiltered).
        widen: bool — widen to ``nprobe[q]`` lists.
        brute: bool — skip IVF, score the verified eligible set directly.
        nprobe: int64 lists after widening (the asked nprobe where not widened).
    """

    need: torch.Tensor
    widen: torch.Tensor
    brute: torch.Tensor
    nprobe: torch.Tensor

    def take(self, rows) -> Widening:
        """The decisions of queries ``rows`` (a slice or index tensor)."""
        return Widening(need=self.need[rows], widen=self.widen[rows], brute=self.brute[rows], nprobe=self.nprobe[rows])


def measured_selectivity(counts: torch.Tensor) -> torch.Tensor:
    """[B, 4] first-scan counts (``SearchStats.selectivity_counts``) → [B] float64 eligible fraction f.

    f = (passed the in-scan filter / live items scanned) × precision of the
    checked candidates, (passed + 1) / (checked + 1).
    """
    precision = (counts[:, 3] + 1).double() / (counts[:, 2] + 1).double()
    return counts[:, 1].double() / counts[:, 0].clamp(min=1).double() * precision


def widen_for_selectivity(frac: torch.Tensor, filtered: torch.Tensor, *, nprobe: int, nlist: int) -> Widening:
    """The adaptive-widening rule: how many lists a filtered query needs at selectivity f.

    The eligible top-k of a query whose filter passes a fraction f of the
    items lie in a wider ball, and about nprobe / √f lists hold it (the ball
    grows sublinearly in lists; nprobe / f overshoots). A query that needs
    more than 1.25 × nprobe is widened to that many lists, rounded up to
    half-steps of nprobe (⌊nprobe / 2⌋, at least 1: each widening is one
    batch, the overshoot stays small and a widened query gets more lists):
    it scans the lists ranked nprobe..w and keeps the best k of both scans.
    One that needs half of all lists or more is pre-filtered.

    Args:
        frac: [B] float64 measured eligible fraction of the scanned items.
        filtered: [B] bool, queries with a filter (others never widen).
    """
    need = torch.where(filtered, nprobe / frac.clamp(min=1e-12).sqrt(), torch.zeros_like(frac))
    brute = filtered & (need >= 0.5 * nlist)
    widen = filtered & ~brute & (need > 1.25 * nprobe)
    half = max(1, nprobe // 2)
    wide = torch.clamp(torch.ceil(need / half) * half, max=nlist).long()
    used = torch.where(widen, wide, torch.where(brute, torch.full_like(wide, nlist), torch.full_like(wide, nprobe)))
    return Widening(need=need, widen=widen, brute=brute, nprobe=used)


def merge_widened(s1: torch.Tensor, p1: torch.Tensor, s2: torch.Tensor, p2: torch.Tensor,
                  k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of the first scan ∪ top-k of the widening lists → the top-k over all of them.

    ``s1``/``p1`` [b, k]: a query's answer over its first nprobe lists;
    ``s2``/``p2`` [b, k]: over the lists ranked nprobe..w (both ordered, −inf
    / −1 pads). The lists are disjoint, so the k best of both, by (score
    desc, position asc), are the answer of one scan over all w lists. A
    position in both (a list ranked differently by the widening probe of a
    subset than by the batch's first probe, at a near-tie of centroid
    scores) is kept once, at its higher score. Returns (scores, positions) [b, k].
    """
    s, p = order_results(torch.cat([s1, s2], 1), torch.cat([p1, p2], 1))
    o = p.argsort(dim=1, stable=True)  # equal positions: the higher score first (rows are score-ordered)
    ps = p.gather(1, o)
    dup = torch.zeros_like(ps, dtype=torch.bool)
    dup[:, 1:] = (ps[:, 1:] == ps[:, :-1]) & (ps[:, 1:] >= 0)
    if bool(dup.any()):
        drop = torch.zeros_like(dup).scatter_(1, o, dup)
        s, p = order_results(s.masked_fill(drop, float("-inf")), p.masked_fill(drop, -1))
    return s[:, :k], p[:, :k]


def run(index, xq: torch.Tensor, *, k: int, nprobe: int, filters: CompiledFilters | None, exact: bool,
        adaptive: bool, stats: bool = False, small_batch: int = SMALL_BATCH, chunk_budget: int = CHUNK_BUDGET,
        skip: int = 0):
    """Search validated queries over ``index`` (``ItemIndex.search`` validates, then calls this).

    Args:
        index: the ``ItemIndex``.
        xq: [B, D] fp32 queries on the index's device (``prepare_queries``).
        k, nprobe: validated (``ItemIndex._check_k_nprobe``).
        filters: the compiled batch filter, None = unfiltered.
        exact, adaptive: as in ``ItemIndex.search`` (``adaptive`` resolved).
        stats: also return a ``SearchStats``.
        small_batch: unfiltered CPU batches up to this size take the lean path.
        chunk_budget: scores one chunk may hold.
        skip: scan only the lists ranked skip..nprobe (``ItemIndex.search(skip_lists=)``; not adaptive).
    Returns:
        (scores [B, k], ids [B, k]) — plus ``SearchStats`` with ``stats``.
    """
    dev = index.scan_device
    B = xq.shape[0]
    tally = None
    if stats:
        tally = _Tally(nprobe=nprobe, nprobe_used=torch.full((B,), nprobe, dtype=torch.int64),
                       backend=_backend(index, xq, filters),
                       selectivity_counts=torch.zeros(B, 4, dtype=torch.int64))
    qprog_all = None if filters is None else filters.query_program.to(dev)
    # each filtered query's first scan, sized once for the batch from the selectivity sample
    plan = first_scan_plan(index, filters, qprog_all, nprobe) if filters is not None and adaptive and not skip \
        else None
    widest = nprobe
    if plan is not None and bool((~plan.brute).any()):
        widest = max(nprobe, int(plan.nprobe[~plan.brute].max()))  # chunks bound the widest first scan
    avg = max(1, index.capacity // max(index.nlist, 1))
    scanned = widest * avg
    per_query = scanned + min(16 * k, scanned + 16 * nprobe)  # probed scores + selected candidates
    step = max(1, min(B, chunk_budget // max(per_query, 1)))
    if filters is None and B <= small_batch and step >= B and not skip:
        fast = _small_batch_cpu(index, xq, k, nprobe, tally)
        if fast is not None:
            return fast if tally is None else (*fast, tally.freeze(B))
    masks = None if filters is None else BlockMasks(filters.programs)

    def chunk(rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        if tally is not None:
            tally.rows = rows
            tally.chunks += 1
        if filters is None:  # the scan maps positions to ids itself (sequential reads)
            with stage("probe"):
                probe = probe_lists(xq[rows], index.centroids, nprobe)[:, skip:]
            if tally is not None:
                tally.probed(index, probe)
            with stage("scan"):
                s, _, ids = index.scan_topk(xq[rows], probe, k, with_ids=True)
            if index.tiering is not None:
                index.observe_probe(probe)
            return s, ids
        s, p = _search_chunk(index, xq[rows], k, nprobe, filters, masks, qprog_all[rows], exact, adaptive, tally,
                             skip, None if plan is None else plan.take(rows))
        return s, index.positions_to_ids(p)

    if step >= B:  # one chunk (the common case): no copies
        out = chunk(slice(0, B))
    else:
        out_s = torch.empty(B, k, device=dev)
        out_i = torch.empty(B, k, dtype=torch.int64, device=dev)
        for s in range(0, B, step):
            rows = slice(s, s + step)
            out_s[rows], out_i[rows] = chunk(rows)
        out = (out_s, out_i)
    return out if tally is None else (*out, tally.freeze(B))


def _backend(index, xq: torch.Tensor, filters: CompiledFilters | None) -> ScanBackend:
    if index.scan_device.type == "cuda":
        return ScanBackend.CUDA_TRITON
    fusable = cpu_scan.HAVE_NUMBA and index.capacity < 1 << 32 and (
        filters is None or filters.term_words.shape[0] <= cpu_scan.MAX_TERMS)
    return ScanBackend.CPU_FUSED if fusable else ScanBackend.CPU_TORCH


def _small_batch_cpu(index, xq: torch.Tensor, k: int, nprobe: int, tally: _Tally | None):
    """Unfiltered small batches on CPU: ``probe_lists`` + one compiled call, nothing else.

    At batch 1 a search is ~0.5 ms of scan; a dozen PyTorch ops around it
    would add a fifth. Same results contract as the general path. Returns
    None when the fused scan cannot run here.
    """
    views = index.numpy_views()
    if views is None or xq.device.type != "cpu":
        return None
    x = np.ascontiguousarray(xq.numpy())
    with stage("probe"):
        probe = probe_lists(xq, index.centroids, nprobe).numpy()
    with stage("scan"):
        s, _, _, ids = cpu_scan.fused_topk(
            x, np.ascontiguousarray(probe, dtype=np.int64), views["codes"], views["scales"], views["list_offsets"],
            views["alive"], k, item_ids=views["item_ids"],
        )
    if index.tiering is not None:
        index.observe_probe(probe)
    if tally is not None:
        tally.backend = ScanBackend.CPU_LEAN
        tally.chunks = 1
        tally.probed(index, torch.from_numpy(probe))
    return torch.from_numpy(s), torch.from_numpy(ids)


@staged("filter")
def verify(index, positions: torch.Tensor, qprog: torch.Tensor, filters: CompiledFilters) -> torch.Tensor:
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
        hits = exact_term_hits(index.attr_ids, index.attr_offsets, flat[need], term_vocab)
        ev = plan.eval(hits)  # [P, M]
        ok[need] = ev[fprog[need], torch.arange(need.numel(), device=flat.device)]
    return ok.reshape(b, K)


def first_scan_plan(index, filters: CompiledFilters, qprog: torch.Tensor, nprobe: int) -> Widening | None:
    """Each filtered query's first scan, sized before it runs: the widening rule on the eligible
    fraction of its filter estimated on the index's selectivity sample
    (``sterling.model.selectivity``). None when the index has no sample (built before it
    existed): the first scan is then nprobe lists and only the measured rule widens.

    The router calls this with its head index (the same sample, carried into every slice), so
    the cluster sizes the same first scans as the single-process model.
    """
    sample = getattr(index, "selectivity_sample", None)
    filtered = qprog >= 0
    if sample is None or not bool(filtered.any()):
        return None
    with stage("filter"):
        est = sample.eligible_fraction(filters.programs, filters.term_vocab).to(qprog.device)
    frac = torch.where(filtered, est[qprog.clamp(min=0)], torch.ones_like(est[:1]).expand(qprog.shape[0]))
    return widen_for_selectivity(frac, filtered, nprobe=nprobe, nlist=index.nlist)


def _search_chunk(index, xq, k, nprobe, filters, masks, qprog, exact, adaptive, tally, skip=0, plan=None):
    """Search one chunk of filtered queries, sized and widened for selectivity.

    With ``adaptive`` each filtered query's first scan is sized by its filter's eligible
    fraction estimated on the index's selectivity sample (``first_scan_plan``): the
    lists the widening rule asks for, or straight to its exactly verified eligible set
    (``_prefilter_topk``) when that is half of all lists or more; queries of one first
    size are scanned together. Then the measured selectivity of that scan
    (``measured_selectivity``) widens further where the estimate fell short. Turn both
    off with ``adaptive=False``. ``skip``: scan only the lists ranked skip..nprobe (a
    shard's part of a widening; never adaptive). ``plan``: these queries' rows of the
    batch's ``first_scan_plan`` (None: every first scan is nprobe lists).
    """
    filtered = qprog >= 0
    if plan is None or not bool((plan.widen | plan.brute).any()):
        return _search_group(index, xq, k, nprobe, nprobe, filters, masks, qprog, exact, adaptive, tally, skip,
                             None)
    b, dev = xq.shape[0], xq.device
    out_s = torch.full((b, k), float("-inf"), device=dev)
    out_p = torch.full((b, k), -1, dtype=torch.int64, device=dev)
    if tally is not None:
        tally.presized += int((plan.widen | plan.brute).sum())
    scan = ~plan.brute
    for w in plan.nprobe[scan].unique().tolist():
        grp = (scan & (plan.nprobe == w)).nonzero().squeeze(1)
        out_s[grp], out_p[grp] = _search_group(index, xq[grp], k, nprobe, int(w), filters, masks, qprog[grp],
                                               exact, adaptive, tally, 0, grp)
    if bool(plan.brute.any()):
        has_not = _has_not(filters, dev)
        must_verify = filtered & (exact | has_not[qprog])
        rows = plan.brute.nonzero().squeeze(1)
        _prefilter_rows(index, xq, k, filters, qprog, must_verify, rows, out_s, out_p, tally, rows)
    return out_s, out_p


def _has_not(filters: CompiledFilters, dev) -> torch.Tensor:
    """[P + 1] bool: which programs hold a NOT (the Bloom pass cannot decide those); last = unfiltered."""
    return torch.tensor([any(op == OP_NOT for op, _ in p) for p in filters.programs] + [False]).to(dev)


def _prefilter_rows(index, xq, k, filters, qprog, must_verify, rows, out_s, out_p, tally, chunk_rows):
    """Queries ``rows`` scored on their whole verified eligible set, one pass per program
    (``chunk_rows``: the same queries' rows in the chunk, for the stats)."""
    for prog in qprog[rows].unique().tolist():
        pick = qprog[rows] == prog
        sel = rows[pick]
        check = bool(must_verify[sel].any())
        out_s[sel], out_p[sel] = _prefilter_topk(index, xq[sel], k, filters, prog, verify_exact=check, tally=tally)
        if tally is not None:
            tally.prefiltered += sel.numel()
            tally.set_nprobe(chunk_rows[pick], index.nlist)
    if index.tiering is not None:
        index.tiering.observe_all(index.tier_tensors())


def _search_group(index, xq, k, nprobe, first, filters, masks, qprog, exact, adaptive, tally, skip, grp):
    """Filtered queries whose first scan is ``first`` lists (nprobe, or the sampled estimate's size),
    then the measured widening rule (relative to ``nprobe``) beyond them.

    ``grp``: these queries' rows in the chunk (None: all of it), for the stats.
    """
    with stage("probe"):
        probe = probe_lists(xq, index.centroids, first)[:, skip:]
    rows_of = (lambda sel: sel) if grp is None else (lambda sel: grp[sel.to(grp.device)])
    if tally is not None:
        tally.probed(index, probe)
        if first != nprobe:
            tally.set_nprobe(rows_of(torch.arange(xq.shape[0])), first)
    try:
        filtered = qprog >= 0
        if not bool(filtered.any()):
            return index.scan_topk(xq, probe, k)
        dev = xq.device
        must_verify = filtered & (exact | _has_not(filters, dev)[qprog])
        # per query: live items scanned, Bloom survivors, candidates checked, passed
        seen = torch.zeros(xq.shape[0], 4, dtype=torch.int64, device=dev)
        out_s, out_p = _scan_verified(index, xq, probe, k, filters, masks, qprog, must_verify, seen, tally)
        if tally is not None:
            if grp is None:
                tally.selectivity_counts[tally.rows] = seen.cpu()
            else:
                tally.selectivity_counts[tally.rows][grp.cpu()] = seen.cpu()
        if not adaptive:
            return out_s, out_p
        wd = widen_for_selectivity(measured_selectivity(seen), filtered, nprobe=nprobe, nlist=index.nlist)
        more = wd.widen & (wd.nprobe > first)
        if bool(more.any()):
            rows = more.nonzero().squeeze(1)
            wide = wd.nprobe[rows]
            if tally is not None:
                tally.widened += rows.numel()
            for w in wide.unique().tolist():
                sel = rows[wide == w]
                with stage("probe"):  # only the lists ranked first..w: the first ones are scanned
                    p2 = probe_lists(xq[sel], index.centroids, int(w))[:, first:]
                s2, q2 = _scan_verified(index, xq[sel], p2, k, filters, masks, qprog[sel], must_verify[sel],
                                        None, tally)
                out_s[sel], out_p[sel] = merge_widened(out_s[sel], out_p[sel], s2, q2, k)
                if index.tiering is not None:
                    index.observe_probe(p2)
                if tally is not None:
                    tally.widen_rounds += 1
                    tally.probed(index, p2)
                    tally.set_nprobe(rows_of(sel), int(w))
        if bool(wd.brute.any()):
            rows = wd.brute.nonzero().squeeze(1)
            _prefilter_rows(index, xq, k, filters, qprog, must_verify, rows, out_s, out_p, tally, rows_of(rows))
        return out_s, out_p
    finally:
        if index.tiering is not None:  # after the scan, so a release never precedes the reads
            index.observe_probe(probe)


def _fused_exact(index, xq: torch.Tensor, filters: CompiledFilters) -> bool:
    """Whether the compiled CPU scan can take this batch's filter, exact checks included."""
    return (
        cpu_scan.HAVE_NUMBA
        and xq.device.type == "cpu"
        and index.scan_device.type == "cpu"
        and not index.partitioned
        and index.capacity < 1 << 31
        and filters.term_words.shape[0] <= cpu_scan.MAX_TERMS
    )


@staged("scan")
def _scan_verified(index, xq, probe, k, filters, masks, qprog, must_verify, seen, tally):
    """IVF scan with the Bloom pass; exact check of the survivors where required.

    Scans a margin beyond k, verifies, and rescans with a larger margin
    the rare queries whose verified survivors fall short of k while the
    scan had more candidates. ``seen`` [b, 4] (optional) accumulates per
    query: live items scanned, Bloom survivors, candidates checked, passed.
    """
    if _fused_exact(index, xq, filters):
        # the compiled scan checks these programs exactly: its results are final
        prog_exact = torch.zeros(len(filters.programs), dtype=torch.bool)
        rows = must_verify & (qprog >= 0)
        prog_exact[qprog[rows]] = True
        sf = ScanFilter(index.bloom, filters.term_words, filters.programs, qprog, exact=prog_exact,
                        attr_ids=index.attr_ids, attr_offsets=index.attr_offsets, term_vocab=filters.term_vocab,
                        masks=masks)
        counts = torch.zeros(xq.shape[0], 2, dtype=torch.int64)
        s, p = index.scan_topk(xq, probe, k, scan_filter=sf, counts=counts, fused=True)
        if seen is not None:
            seen[:, :2] += counts
        if tally is not None and bool(rows.any()):
            survivors = _bloom_survivors(index, filters, probe[rows], qprog[rows])
            tally.verified += survivors
            tally.rejected += survivors - int(counts[rows, 1].sum())
        return s, p
    if not bool(must_verify.any()):
        counts = None if seen is None else seen[:, :2]
        sf = ScanFilter(index.bloom, filters.term_words, filters.programs, qprog, masks=masks)
        return index.scan_topk(xq, probe, k, scan_filter=sf, counts=counts)
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
        sf = ScanFilter(index.bloom, filters.term_words, filters.programs, sub_prog, masks=masks)
        s, p = index.scan_topk(xq[pending], probe[pending], k_scan, scan_filter=sf, counts=counts)
        if counts is not None:
            seen[pending, :2] += counts
        verify_prog = torch.where(must_verify[pending], sub_prog, torch.full_like(sub_prog, -1))
        ok = verify(index, p, verify_prog, filters)
        if counts is not None:
            # precision of the Bloom survivors, for the selectivity estimate
            seen[pending, 2] += (p >= 0).sum(1)
            seen[pending, 3] += ok.sum(1)
        if tally is not None:
            checked = (p >= 0) & (verify_prog >= 0)[:, None]
            tally.verified += int(checked.sum())
            tally.rejected += int((checked & ~ok).sum())
            if not first:
                tally.refills += pending.numel()
        exhausted = torch.isneginf(s[:, -1])
        s2, p2 = order_results(s.masked_fill(~ok, float("-inf")), p.masked_fill(~ok, -1))
        done = (ok.sum(1) >= k) | exhausted
        idx = pending[done]
        out_s[idx], out_p[idx] = s2[done, :k], p2[done, :k]
        pending = pending[~done]
        k_scan *= 4
        first = False
    return out_s, out_p


def _bloom_survivors(index, filters: CompiledFilters, probe: torch.Tensor, qprog: torch.Tensor) -> int:
    """Live items of the probed lists that pass their query's Bloom pass, summed (stats only).

    One Bloom pass per distinct program over the lists its queries probe.
    """
    offs = index.list_offsets.tolist()
    total = 0
    for prog in qprog.unique().tolist():
        plan = FilterPlan.build([filters.programs[prog]], bloom=True)
        words = filters.term_words[plan.terms].to(index.scan_device)
        lists, times = probe[qprog == prog].reshape(-1).unique(return_counts=True)
        for lst, n in zip(lists.tolist(), times.tolist()):
            start, end = offs[lst], offs[lst + 1]
            if end > start:
                ok = plan.eval(bloom_term_hits(index.item_rows("bloom", start, end), words))[0]
                total += n * int((ok & unpack_bits_range(index.alive, start, end)).sum())
    return total


@staged("filter")
def _prefilter_topk(index, xq, k, filters, prog: int, *, verify_exact: bool, tally: _Tally | None = None):
    """Exact top-k over the whole eligible set: Bloom pass over every item, exact check, score."""
    cand = []
    step = PREFILTER_STEP
    plan = FilterPlan.build([filters.programs[prog]], bloom=True)
    words = filters.term_words[plan.terms].to(index.scan_device)
    for start in range(0, index.capacity, step):
        end = min(start + step, index.capacity)
        ok = plan.eval(bloom_term_hits(index.item_rows("bloom", start, end), words))[0]
        ok &= unpack_bits_range(index.alive, start, end)
        cand.append(ok.nonzero().squeeze(1) + start)
    pos = torch.cat(cand)
    if verify_exact and pos.numel():
        keep = verify(index, pos[None, :], torch.full((1,), prog, dtype=torch.int64, device=pos.device), filters)[0]
        if tally is not None:
            tally.verified += pos.numel()
            tally.rejected += int((~keep).sum())
        pos = pos[keep]
    b, dev = xq.shape[0], xq.device
    out_s = torch.full((b, k), float("-inf"), device=dev)
    out_p = torch.full((b, k), -1, dtype=torch.int64, device=dev)
    for s in range(0, pos.numel(), step):
        blk = pos[s : s + step]
        sc = (xq @ index.rows_at("codes", blk).float().T) * index.rows_at("scales", blk)
        both_s = torch.cat([out_s, sc], dim=1)
        both_p = torch.cat([out_p, blk.expand(b, -1)], dim=1)
        kk = min(k, both_s.shape[1])
        top_s, top_i = both_s.topk(kk, dim=1)
        out_s[:, :kk], out_p[:, :kk] = top_s, both_p.gather(1, top_i)
    return order_results(out_s, out_p)
