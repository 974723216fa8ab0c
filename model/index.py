"""``ItemIndex``: the catalog as an ``nn.Module`` of registered buffers.

Every tensor of the index is a buffer (DESIGN §3), so ``state_dict``, device
moves and the artifact all see the whole index. Search is probe-then-filter:
pick ``nprobe`` lists per query, Bloom-test the request's filter only on the
items of those lists while scanning them, keep a partial top-k per list,
merge, then re-check the survivors against the exact attribute store. This
class holds the buffers and validates the request; how the search runs
(chunking, verification, refill, adaptive widening) is ``model/search.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sterling.kernels import cpu_scan
from sterling.kernels.bits import unpack_bits_range
from sterling.kernels.ivf import ListStats, ids_of_positions, ivf_topk
from sterling.model import bloom as bloom_mod
from sterling.model import search as search_mod
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
from sterling.model.selectivity import SelectivitySample
from sterling.model.stages import stage
from sterling.model.tiers import PER_ITEM_TENSORS, SLOW_ADVICE, TieredStorage, TierLayout, pick_fast

__all__ = ["ItemIndex", "prepare_queries"]

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
# Slow-tier bytes a tiered index scans between two releases of its mapped pages (the resident
# window the planner adds to the fast tier; ``planner.tiers.COLD_WINDOW_BYTES`` is the same).
DEFAULT_COLD_WINDOW = 32 << 20


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
        tiers: TierLayout | None = None,
        selectivity: SelectivitySample | None = None,
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
        self.tier_layout = tiers if tiers is not None and tiers.nlist == self.nlist else None
        # a build-time sample of items' exact attribute sets: sizes a filtered query's first scan
        # (``sterling.model.selectivity``); carried whole into every slice, None for older artifacts
        self.selectivity_sample = selectivity
        self._tiering: TieredStorage | None = None
        self._mapped: dict[str, int] = {}  # buffer → data_ptr, for buffers that are views of the artifact

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
        if self.scan_device.type == "cuda":
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
        *,
        return_stats: bool = False,
        skip_lists: int = 0,
    ):
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
            return_stats: also return a ``sterling.model.search.SearchStats``
                (lists probed, nprobe after widening, verified / rejected
                candidates, ...). Off, nothing is counted.
            skip_lists: scan only the lists ranked ``skip_lists``..``nprobe``
                by centroid score (0 = all ``nprobe``), with ``adaptive=False``:
                what a document shard scans when the router widens a query
                whose first ``skip_lists`` lists it has already answered
                (``sterling.model.search.merge_widened`` merges the two).
        Returns:
            (scores [B, k] fp32, ids [B, k] int64); missing results are
            −inf / −1. Within equal scores, lower index position first.
            With ``return_stats``: (scores, ids, stats).
        How the search runs (chunking, verification, widening) is
        ``sterling.model.search``.
        """
        if torch.compiler.is_compiling():  # data-dependent loops: a compiled model calls it eagerly
            return self._search_eager(xq, k, nprobe, where, exact, adaptive, return_stats, skip_lists)
        return self._search(xq, k, nprobe, where, exact, adaptive, return_stats, skip_lists)

    @torch.compiler.disable
    def _search_eager(self, *args):
        return self._search(*args)

    def _search(self, xq, k, nprobe, where, exact, adaptive, return_stats=False, skip_lists=0):
        # (no torch.no_grad(): its context costs more than a small search; the queries are
        # detached and every buffer is a constant, so no autograd graph is recorded)
        xq = prepare_queries(xq, self.dim, self.metric)
        k, nprobe = self._check_k_nprobe(k, nprobe)
        dev = self.scan_device
        if xq.device != dev:  # queries go to the index, results come back on the index's device
            xq = xq.to(dev)
        filters = None
        if not (where is None or (isinstance(where, str) and not where.strip())):
            with stage("filter"):
                filters = self.compile_filters(where, xq.shape[0])
        adaptive = self.config.adaptive_filter if adaptive is None else adaptive
        if skip_lists:
            if isinstance(skip_lists, bool) or not isinstance(skip_lists, (int, np.integer)) \
                    or not 0 <= skip_lists < nprobe or adaptive:
                raise InvalidInputError(
                    f"skip_lists ({skip_lists!r}) must be an integer in 0..nprobe - 1 ({nprobe - 1}) with "
                    f"adaptive=False (adaptive={adaptive})"
                )
        return search_mod.run(self, xq, k=k, nprobe=nprobe, filters=filters, exact=exact, adaptive=adaptive,
                              stats=return_stats, skip=int(skip_lists))

    def verify(self, positions: torch.Tensor, qprog: torch.Tensor, filters: CompiledFilters) -> torch.Tensor:
        """Exact filter check: positions [b, K] with program per row [b] → bool [b, K] (``search.verify``)."""
        return search_mod.verify(self, positions, qprog, filters)

    # ------------------------------------------------- views for the search
    partitioned = False  # one array per tensor (a ``TieredIndex`` holds its lists in two parts)

    @property
    def scan_device(self) -> torch.device:
        """Where the scan runs (the device of the codes)."""
        return self.codes.device

    def scan_topk(self, xq, probe, k, *, scan_filter=None, counts=None, fused=None, with_ids: bool = False):
        """``ivf_topk`` over this index's buffers: (scores, positions) [B, k] (+ ids with ``with_ids``)."""
        return ivf_topk(xq, probe, k=k, scan_filter=scan_filter, counts=counts, fused=fused,
                        item_ids=self.item_ids if with_ids else None, **self.scan_tensors())

    def item_rows(self, name: str, start: int, end: int) -> torch.Tensor:
        """Rows ``start..end-1`` of the per-item buffer ``name``."""
        return getattr(self, name)[start:end]

    def rows_at(self, name: str, pos: torch.Tensor) -> torch.Tensor:
        """Rows of the per-item buffer ``name`` at positions ``pos`` [M]."""
        return getattr(self, name)[pos]

    def to_tiers(self, fast, *, device="cuda", mode="stream", staging_bytes: int | None = None,
                 pin: bool | None = None):
        """A two-tier copy for serving: hot lists on ``device``, the rest in (pinned) host memory.

        ``mode``: ``"stream"`` (the cold lists a batch probes are copied in chunks into a
        bounded staging buffer, overlapped with the hot scan) or ``"zero-copy"`` (the kernel
        reads host memory in place). See ``sterling.model.device_tiers``.
        """
        from sterling.model.device_tiers import DEFAULT_STAGING_BYTES, TieredIndex

        return TieredIndex(self, fast, device=device, mode=mode, pin=pin,
                           staging_bytes=DEFAULT_STAGING_BYTES if staging_bytes is None else staging_bytes)

    def scan_tensors(self) -> dict:
        """The buffers every scan reads, as ``ivf_topk`` keyword arguments."""
        args = dict(codes=self.codes, scales=self.scales, list_offsets=self.list_offsets, alive=self.alive)
        if self.codes.device.type == "cuda":
            args["list_stats"] = self._list_stats()
        return args

    def live_per_list(self) -> torch.Tensor:
        """[nlist] int64 live items per list, on CPU (cached while the buffers stay)."""

        def build(alive, offsets):
            bits = unpack_bits_range(alive, 0, self.capacity).cpu().long()
            prefix = torch.cat([torch.zeros(1, dtype=torch.int64), bits.cumsum(0)])
            offs = offsets.cpu()
            return prefix[offs[1:]] - prefix[offs[:-1]]

        return self._cached("live_per_list", [self.alive, self.list_offsets], build)

    def _list_stats(self) -> ListStats:
        """Host-side list sizes for the GPU path, read back once per list layout."""
        return self._cached("list_stats", [self.list_offsets], ListStats.of)

    def numpy_views(self) -> dict | None:
        """numpy views of the CPU buffers the fused scan reads (cached while the buffers stay)."""
        if not cpu_scan.HAVE_NUMBA or self.codes.device.type != "cpu" or self.capacity >= 1 << 32:
            return None
        names = ("codes", "scales", "list_offsets", "alive", "item_ids")

        def build(*tensors):
            return {n: t.numpy() for n, t in zip(names, tensors)}

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

    # ------------------------------------------------------------- artifact
    def meta(self) -> dict:
        meta = {
            "config": self.config.to_dict(),
            "vocab": self.vocab,
            "bloom": {"words": self.bloom_spec.words, "hashes": self.bloom_spec.hashes},
        }
        if self.tier_layout is not None:
            meta["tiers"] = self.tier_layout.to_meta()
        if self.selectivity_sample is not None:
            meta["selectivity_sample"] = self.selectivity_sample.to_meta()
        return meta

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in _BUFFERS}

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor]) -> ItemIndex:
        return cls(
            config=IndexConfig.from_dict(meta["config"]),
            vocab=meta["vocab"],
            bloom_spec=bloom_mod.BloomSpec(**meta["bloom"]),
            tensors=tensors,
            tiers=TierLayout.from_meta(meta.get("tiers"), int(tensors["centroids"].shape[0]))
            if "centroids" in tensors else None,
            selectivity=SelectivitySample.from_meta(meta.get("selectivity_sample")),
        )

    def save(self, path: str | Path) -> None:
        """Write one atomic, checksummed artifact."""
        write_artifact(path, kind="item_index", meta={"index": self.meta()}, tensors=self.tensors())

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True, tiers: bool | None = None,
             cold_window: int | None = None, slow_advice: str | None = None) -> ItemIndex:
        """Load an index artifact (or the index of a model artifact), memory-mapped.

        ``tiers``: apply the artifact's memory tiers (``apply_tiers``); the
        default applies them when the artifact records a tier for each list
        (``sterling retier``), else every list is left as mapped.
        ``cold_window``: default the planned one recorded by ``sterling retier``, else
        ``DEFAULT_COLD_WINDOW``. ``slow_advice``: default the recorded one, else ``"normal"``
        (``apply_tiers``).
        """
        h, tensors = read_artifact(path, verify=verify)
        if "index" not in h["meta"]:
            raise ArtifactError(f"{path} holds a {h['kind']!r}, which has no item index")
        prefix = "" if h["kind"] == "item_index" else "index."
        own = {n[len(prefix) :]: t for n, t in tensors.items() if n.startswith(prefix)}
        index = cls.from_parts(h["meta"]["index"], own)
        index.mark_mapped()
        if tiers or (tiers is None and index.tier_layout is not None and index.tier_layout.fast is not None):
            index.apply_tiers(cold_window=index._recorded_window() if cold_window is None else cold_window,
                              slow_advice=slow_advice)
        return index

    # ---------------------------------------------------------------- tiers
    def mark_mapped(self) -> None:
        """Record the current buffers as views of the memory-mapped artifact (done by ``load``)."""
        self._mapped = {n: getattr(self, n).data_ptr() for n in PER_ITEM_TENSORS}

    def _recorded_window(self) -> int:
        w = self.tier_layout.cold_window if self.tier_layout is not None else None
        return DEFAULT_COLD_WINDOW if w is None else int(w)

    def tier_tensors(self) -> dict[str, torch.Tensor]:
        """The buffers the tiers move: per-item tensors and the list offsets."""
        return {n: getattr(self, n) for n in (*PER_ITEM_TENSORS, "list_offsets")}

    def observe_probe(self, probe) -> None:
        """Count a search's probed lists [B, nprobe] for the tiers (call only when ``tiering`` is set)."""
        probe = probe.numpy() if isinstance(probe, torch.Tensor) else probe
        self._tiering.observe(probe, self.tier_tensors())

    @property
    def tiering(self) -> TieredStorage | None:
        """Runtime tier state (None when every list is handled alike)."""
        return self._tiering

    def apply_tiers(self, fast=None, *, cold_window: int = DEFAULT_COLD_WINDOW,
                    slow_advice: str | None = None) -> TieredStorage:
        """Split the IVF lists into a resident tier and the memory-mapped artifact (``model/tiers.py``).

        Args:
            fast: [nlist] bool, True = resident (default: the artifact's layout).
            cold_window: slow-tier bytes scanned between two releases of their pages.
            slow_advice: how a cold fault reads the slow tier: ``"normal"`` (the kernel's
                read-around) or ``"random"`` (``MADV_RANDOM``: its own page only); default the
                artifact's recorded one (``sterling retier --plan``), else ``"normal"``.
        Search results do not change; only which pages stay in memory, and how they are read, do.
        """
        if slow_advice is None:
            layout = self.tier_layout
            slow_advice = layout.slow_advice if layout is not None and layout.slow_advice else "normal"
        if slow_advice not in SLOW_ADVICE:
            raise InvalidInputError(f"slow_advice ({slow_advice!r}) must be one of {SLOW_ADVICE}")
        if fast is None:
            if self.tier_layout is None or self.tier_layout.fast is None:
                raise InvalidInputError(
                    "this index records no tier per list; pass fast=[nlist] bools, or run "
                    "`sterling retier --model M --plan plan.json` first"
                )
            fast = self.tier_layout.fast
        fast = np.asarray(fast, dtype=bool)
        if fast.shape != (self.nlist,):
            raise InvalidInputError(f"fast has shape {fast.shape}; the index has nlist = {self.nlist} lists")
        if isinstance(cold_window, bool) or not isinstance(cold_window, (int, np.integer)) or cold_window < 0:
            raise InvalidInputError(f"cold_window ({cold_window!r}) must be a byte count ≥ 0")
        if self.codes.device.type != "cpu":
            raise InvalidInputError(
                f"tiers on {self.codes.device} are not supported: the CPU tiers keep cold lists in the "
                "memory-mapped artifact; load the index on CPU"
            )
        tensors = self.tier_tensors()
        if not self._mapped or any(tensors[n].data_ptr() != p for n, p in self._mapped.items()):
            raise InvalidInputError(
                "the slow tier is the memory-mapped artifact, and this index is not (or no longer) a view "
                "of one: save it and load it with ItemIndex.load(path)"
            )
        st = TieredStorage.build(tensors, fast, int(cold_window))
        st.promote(tensors)
        st.release(tensors)
        st.advise(tensors, slow_advice)  # after the promotion: those pages are read in bulk
        self._tiering = st
        layout = self.tier_layout
        self.tier_layout = (layout.with_fast(fast, int(cold_window), slow_advice) if layout is not None else
                            TierLayout(probe_freq=np.zeros(self.nlist), nprobe=0, queries=0, fast=fast,
                                       cold_window=int(cold_window), slow_advice=slow_advice))
        return st

    def retier(self, fast) -> None:
        """Move lists between tiers while searches keep running (answers never change)."""
        if self._tiering is None:
            self.apply_tiers(fast)
            return
        self._tiering.set_fast(np.asarray(fast, dtype=bool), self.tier_tensors())
        self.tier_layout = self.tier_layout.with_fast(np.asarray(fast, dtype=bool))

    def retier_from_observed(self, fast_bytes: int, *, prior_queries: int = 1000) -> np.ndarray:
        """Re-pick the fast lists from the probe counts observed while serving.

        The build-time probe statistics count as ``prior_queries`` queries, so
        a few early queries do not reshuffle the tiers. Returns the new mask.
        """
        st = self._tiering
        if st is None:
            raise InvalidInputError("the index is not tiered; call apply_tiers first")
        prior = self.tier_layout.probe_freq if self.tier_layout is not None else np.zeros(self.nlist)
        n = st.queries_observed
        freq = (prior * prior_queries + st.observed) / max(1, prior_queries + n)
        fast = pick_fast(freq, st.list_bytes, int(fast_bytes))
        self.retier(fast)
        return fast
