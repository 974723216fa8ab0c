"""``build_index``: catalog → ``ItemIndex`` in one streaming pass (plus a sample).

1. spherical k-means on a sample (``kmeans_points_per_list`` × nlist rows);
2. stream every item in chunks: check finite, (normalise,) assign to its
   list, quantize to int8 + scale — only one chunk is fp32 at a time;
3. reorder into cluster-contiguous slots (CSR ``list_offsets``, optional
   per-list slack for upserts), copying int8 rows chunk by chunk;
4. attributes → exact CSR store and Bloom signatures in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sterling.kernels import pack_bits, quantize_int8
from sterling.model import bloom as bloom_mod
from sterling.model.attributes import Attributes
from sterling.model.catalog import as_source
from sterling.model.config import MAX_ABS_VALUE, IndexConfig, Metric, auto_nlist
from sterling.model.errors import (
    DimensionMismatchError,
    DuplicateIdError,
    EmptyCatalogError,
    InvalidInputError,
    LimitExceededError,
    NonFiniteError,
    TooManyAttributesError,
)
from sterling.model.index import ItemIndex
from sterling.model.kmeans import assign, spherical_kmeans
from sterling.model.selectivity import SelectivitySample, sample_rows
from sterling.model.tiers import TierLayout, measure_probe_freq

__all__ = ["build_index", "check_ids"]


def check_ids(ids: torch.Tensor) -> None:
    """Ids must be non-negative and unique; the message names an offender."""
    if ids.numel() == 0:
        return
    neg = (ids < 0).nonzero()
    if neg.numel():
        i = int(neg[0])
        raise DuplicateIdError(f"item {i} has negative id {int(ids[i])}; ids must be ≥ 0 (−1 marks empty slots)")
    s = ids.sort().values
    dup = (s[1:] == s[:-1]).nonzero()
    if dup.numel():
        raise DuplicateIdError(f"id {int(s[int(dup[0])])} is used by more than one item; ids must be unique")

def build_index(
    embeddings,
    ids=None,
    attributes=None,
    config: IndexConfig | None = None,
    *,
    progress: bool = False,
    query_sample=None,
) -> ItemIndex:
    """Build an ``ItemIndex``.

    Args:
        embeddings: [N, D] float array/tensor (memory-mapped is fine), a path
            to ``.parquet``/``.npy``, or a ``CatalogSource``.
        ids: [N] int64 external ids (default 0..N-1); unique, ≥ 0.
        attributes: per-item lists of ``feature:value`` strings, or an
            ``Attributes`` CSR.
        config: ``IndexConfig`` (default: auto nlist, inner product).
        progress: show progress bars.
        query_sample: [Q, D] queries like the ones the index will serve, to
            measure how often each list is probed (the memory tiers keep the
            hottest lists resident). Default: up to 4096 catalog items.
    """
    config = config or IndexConfig()
    src = as_source(embeddings, ids, attributes)
    N, D = src.num_items, src.dim
    if N == 0:
        raise EmptyCatalogError("the catalog has no items; nothing to index")
    if D < 1:
        raise DimensionMismatchError(f"embeddings have dimension {D}; need at least 1")
    nlist = config.nlist or auto_nlist(N)
    if nlist > N:
        raise InvalidInputError(f"nlist ({nlist}) exceeds the number of items ({N}); use nlist ≤ {N}")
    metric = Metric(config.metric)
    ext_ids = src.ids()
    ext_ids = torch.arange(N, dtype=torch.int64) if ext_ids is None else ext_ids.to(torch.int64)
    check_ids(ext_ids)
    attrs = src.attributes() or Attributes.empty(N)
    _check_attribute_counts(attrs, config.max_attributes_per_item)

    # 1. k-means on a sample
    g = torch.Generator().manual_seed(config.seed)
    n_train = min(N, max(nlist, min(config.max_kmeans_points, nlist * config.kmeans_points_per_list)))
    rows = torch.randperm(N, generator=g)[:n_train].sort().values
    sample = src.take_rows(rows)
    _check_finite(sample, rows)
    centroids = spherical_kmeans(sample, nlist, iters=config.kmeans_iters, seed=config.seed)
    tiers = _probe_stats(sample if query_sample is None else query_sample, centroids, config, nlist, D,
                         source="items" if query_sample is None else "queries")
    del sample

    # 2. stream: assign + quantize
    codes_u = torch.empty(N, D, dtype=torch.int8)
    scales_u = torch.empty(N, dtype=torch.float32)
    lists_u = torch.empty(N, dtype=torch.int64)
    bar = tqdm(total=N, desc="assign+quantize", unit="item", disable=not progress, unit_scale=True)
    for start, x in src.iter_chunks(config.chunk_size):
        _check_finite(x, torch.arange(start, start + x.shape[0]))
        if metric is Metric.COSINE:
            x = F.normalize(x, dim=1)
        end = start + x.shape[0]
        lists_u[start:end] = assign(x, centroids)
        codes_u[start:end], scales_u[start:end] = quantize_int8(x)
        bar.update(x.shape[0])
    bar.close()

    # 3. cluster-contiguous layout with slack
    sizes = torch.bincount(lists_u, minlength=nlist)
    caps = sizes + torch.ceil(sizes.double() * config.list_slack).long()
    list_offsets = torch.zeros(nlist + 1, dtype=torch.int64)
    torch.cumsum(caps, 0, out=list_offsets[1:])
    size_off = torch.zeros(nlist + 1, dtype=torch.int64)
    torch.cumsum(sizes, 0, out=size_off[1:])
    perm = torch.argsort(lists_u, stable=True)  # old row of each sorted item
    lst = lists_u[perm]
    dest = list_offsets[lst] + (torch.arange(N) - size_off[lst])  # slot of each sorted item
    del lists_u, lst
    cap = int(list_offsets[-1])
    codes = torch.zeros(cap, D, dtype=torch.int8)
    scales = torch.zeros(cap, dtype=torch.float32)
    item_ids = torch.full((cap,), -1, dtype=torch.int64)
    for s in range(0, N, config.chunk_size):
        d, p = dest[s : s + config.chunk_size], perm[s : s + config.chunk_size]
        codes[d] = codes_u[p]
        scales[d] = scales_u[p]
        item_ids[d] = ext_ids[p]
    del codes_u, scales_u

    # 4. attributes and Bloom signatures in slot order
    lengths = attrs.offsets[1:] - attrs.offsets[:-1]
    slot_len = torch.zeros(cap, dtype=torch.int64)
    slot_len[dest] = lengths[perm]
    attr_offsets = torch.zeros(cap + 1, dtype=torch.int64)
    torch.cumsum(slot_len, 0, out=attr_offsets[1:])
    src_start = torch.zeros(cap, dtype=torch.int64)
    src_start[dest] = attrs.offsets[:-1][perm]
    nnz = int(attr_offsets[-1])
    within = torch.arange(nnz) - attr_offsets[:-1].repeat_interleave(slot_len)
    attr_ids = attrs.ids[src_start.repeat_interleave(slot_len) + within].to(torch.int32)
    spec = bloom_mod.size_bloom(lengths, config.target_fpr)  # from the terms-per-item histogram
    if config.bloom_bits or config.bloom_hashes:
        spec = bloom_mod.BloomSpec(
            words=(config.bloom_bits or spec.bits) // 64, hashes=config.bloom_hashes or spec.hashes
        )
    vocab_words = bloom_mod.term_words(attrs.vocab, spec)
    signatures = bloom_mod.item_signatures(attr_ids, attr_offsets, vocab_words)

    tensors = {
        "centroids": centroids,
        "list_offsets": list_offsets,
        "codes": codes,
        "scales": scales,
        "item_ids": item_ids,
        "bloom": signatures,
        "attr_ids": attr_ids,
        "attr_offsets": attr_offsets,
        "alive": pack_bits(item_ids >= 0),
        "version": torch.tensor(1, dtype=torch.int64),
    }
    cfg = IndexConfig.from_dict({**config.to_dict(), "nlist": nlist})
    sel = SelectivitySample.from_term_lists(
        attrs.ids[int(attrs.offsets[r]) : int(attrs.offsets[r + 1])].numpy() for r in sample_rows(N).tolist())
    return ItemIndex(config=cfg, vocab=attrs.vocab, bloom_spec=spec, tensors=tensors, tiers=tiers, selectivity=sel)


# Queries the build-time probe statistics are measured on (at most).
PROBE_SAMPLE = 4096


def _probe_stats(xq, centroids: torch.Tensor, config: IndexConfig, nlist: int, D: int, *, source: str) -> TierLayout:
    """Expected probes per query of each list, on ``xq`` (the first ``PROBE_SAMPLE`` rows)."""
    from sterling.model.index import prepare_queries

    xq = prepare_queries(xq, D, Metric(config.metric))[:PROBE_SAMPLE]
    nprobe = config.nprobe or max(1, nlist // 8)
    freq = measure_probe_freq(xq, centroids, nprobe)
    return TierLayout(probe_freq=freq, nprobe=min(nprobe, nlist), queries=int(xq.shape[0]), source=source)


def _check_finite(x: torch.Tensor, rows: torch.Tensor) -> None:
    finite = torch.isfinite(x).all(dim=1)
    if not bool(finite.all()):
        bad = int(rows[int((~finite).nonzero()[0])])
        raise NonFiniteError(
            f"embedding of catalog row {bad} contains NaN or inf; fix or drop that item and rebuild"
        )
    huge = (x.abs() > MAX_ABS_VALUE).any(dim=1)
    if bool(huge.any()):
        i = int(huge.nonzero()[0])
        raise LimitExceededError(
            f"embedding of catalog row {int(rows[i])} holds |value| {float(x[i].abs().max()):.3g} above "
            f"{MAX_ABS_VALUE:.0e}, where fp32 scores overflow; rescale the embeddings",
            name="abs value", value=int(min(float(x[i].abs().max()), 2**62)), limit=int(MAX_ABS_VALUE),
        )



def _check_attribute_counts(attrs: Attributes, limit: int) -> None:
    """Refuse an item with more than ``limit`` terms (the Bloom sizing and the filter scan assume a bound)."""
    if attrs.num_items != 0 and attrs.offsets.numel() > 1:
        lengths = attrs.offsets[1:] - attrs.offsets[:-1]
        worst = int(lengths.argmax())
        n = int(lengths[worst])
        if n > limit:
            raise TooManyAttributesError(
                f"catalog row {worst} has {n} attributes, above max_attributes_per_item ({limit}); drop "
                "terms from that item or raise the limit (IndexConfig.max_attributes_per_item, "
                "`sterling build --max-attributes-per-item`)",
                name="attributes per item", value=n, limit=limit,
            )
