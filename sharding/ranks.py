"""Per-rank slices for one process group on one host: whole IVF lists per rank, balanced by bytes and probe load.

A rank owns a contiguous range of IVF lists, exactly like a document shard
(``sharding.documents``), so the per-rank top-K0 merged by (score desc,
rank, position) is the single-process top-K0. What differs is the balance:
a rank's search time is the bytes it *scans*, not the bytes it *holds*, and
queries do not probe lists uniformly. ``rank_list_ranges`` therefore cuts
the lists so that every rank gets about the same share of

    cost(list) = bytes(list) / Σ bytes  +  load(list) / Σ load

where ``load(list)`` = (sample queries that probe the list) × (items in the
list), measured by probing a query sample exactly as the search does.
Without a sample the cut is by bytes alone (``balanced_list_ranges``).

Every rank artifact is loadable on its own, memory-mapped:

* a plain ``RetrievalModel`` → ``rank-RRRR-of-WWWW.st`` is a document-shard
  slice (``RetrievalModel.load`` reads it); ``head.st`` carries the
  centroids, tower and vocabulary;
* a ``LearnedRetrievalModel`` → every rank file is a learned model over its
  index slice with the user tower (replicated, or sharded with TorchRec
  after loading); only rank 0's file carries the item-side cache, OverArch,
  heads and the users table, since the rerank runs after the merge on rank 0.

Example:
    >>> m = write_rank_slices("model.st", "ranks/", world_size=4, xq_sample=xq)
    >>> [s.lists for s in m.shards]
    [(0, 14), (14, 35), (35, 47), (47, 64)]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from sterling.kernels.ivf import probe_lists
from sterling.model.artifact import read_header
from sterling.model.errors import InvalidInputError
from sterling.model.index import ItemIndex, prepare_queries
from sterling.sharding.documents import (
    HEAD_NAME,
    MANIFEST_NAME,
    ShardManifest,
    ShardSlice,
    _save_slice,
    balanced_list_ranges,
    check_tiling,
    cut_ranges,
    list_bytes,
    list_ranges_from_plan,
    read_manifest,
    slice_index,
    slice_model,
)

__all__ = [
    "RankInfo",
    "probe_load",
    "rank_costs",
    "rank_list_ranges",
    "rank_ranges_within",
    "write_rank_slices",
    "read_rank_manifest",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class RankInfo:
    """What every rank artifact records about the whole model (``meta["shard"]`` / ``extra["rank"]``)."""

    rank: int
    world_size: int
    lists: tuple[int, int]
    capacity: int  # slots of the whole index (K0 → nprobe uses it)
    items: int  # live items of the whole index
    source_version: int


def probe_load(index: ItemIndex, xq: torch.Tensor, nprobe: int) -> torch.Tensor:
    """[nlist] float64: Σ over sample queries of the items scanned in each list (probed lists × list size).

    The probe is the search's own (``probe_lists`` on normalised queries), so
    the load is what a rank holding the list would scan for this sample.
    """
    xq = prepare_queries(torch.as_tensor(xq, dtype=torch.float32), index.dim, index.metric)
    if isinstance(nprobe, bool) or not isinstance(nprobe, int) or not 1 <= nprobe <= index.nlist:
        raise InvalidInputError(f"nprobe ({nprobe!r}) must be an integer in 1..nlist ({index.nlist})")
    hits = torch.zeros(index.nlist, dtype=torch.float64)
    for s in range(0, xq.shape[0], 4096):
        p = probe_lists(xq[s : s + 4096], index.centroids, nprobe).reshape(-1)
        hits += torch.bincount(p, minlength=index.nlist).double()
    sizes = (index.list_offsets[1:] - index.list_offsets[:-1]).double()
    return hits * sizes


def _list_costs(index: ItemIndex, xq_sample, nprobe: int | None) -> torch.Tensor:
    b = list_bytes(index).double()
    cost = b / b.sum().clamp(min=1.0)
    if xq_sample is not None:
        load = probe_load(index, xq_sample, nprobe or index.default_nprobe())
        if float(load.sum()) > 0:
            cost = cost + load / load.sum()
    return cost


def rank_list_ranges(
    index: ItemIndex, world_size: int, *, xq_sample=None, nprobe: int | None = None
) -> list[tuple[int, int]]:
    """Contiguous ranges of whole lists, one per rank, balanced by bytes and (with a sample) probe load.

    Args:
        index: the whole model's index.
        world_size: number of ranks (1..nlist).
        xq_sample: [n, D] representative queries (e.g. a day's user
            embeddings); ``None`` balances by bytes only.
        nprobe: the probe the sample is measured with (default: the index's).
    """
    if xq_sample is None:
        return balanced_list_ranges(index, world_size)
    return cut_ranges(_list_costs(index, xq_sample, nprobe), world_size)


def rank_ranges_within(index: ItemIndex, lists: tuple[int, int], world_size: int) -> list[tuple[int, int]]:
    """``world_size`` contiguous ranges of whole lists inside a document shard's ``lists``, balanced by bytes.

    For a process group over one document shard (``sterling launch ray
    --ranks-per-host N``): the shard artifact keeps every centroid and empty
    lists outside ``lists``, so the cut is over its own lists only.
    """
    a, b = int(lists[0]), int(lists[1])
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not 1 <= world_size <= b - a:
        raise InvalidInputError(
            f"{world_size!r} ranks cannot split the {b - a} IVF lists [{a}, {b}) of this document shard (a rank "
            f"owns whole lists): use at most {b - a} ranks per host (--ranks-per-host) or fewer shards (--shards)"
        )
    return [(a + x, a + y) for x, y in cut_ranges(list_bytes(index)[a:b], world_size)]


def rank_costs(index: ItemIndex, ranges, *, xq_sample=None, nprobe: int | None = None) -> dict[str, list[float]]:
    """Per-rank shares of bytes and (with a sample) probe load, for reports and tests."""
    b = list_bytes(index).double()
    out = {"bytes": [float(b[a:e].sum() / b.sum()) for a, e in ranges]}
    if xq_sample is not None:
        load = probe_load(index, xq_sample, nprobe or index.default_nprobe())
        out["load"] = [float(load[a:e].sum() / load.sum().clamp(min=1.0)) for a, e in ranges]
    return out


def _rank_name(r: int, n: int) -> str:
    return f"rank-{r:04d}-of-{n:04d}.st"


def write_rank_slices(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    world_size: int | None = None,
    plan=None,
    plan_path: str | None = None,
    xq_sample=None,
    nprobe: int | None = None,
    ranges: list[tuple[int, int]] | None = None,
) -> ShardManifest:
    """Write one artifact per rank and ``manifest.json`` into ``out_dir``; returns the manifest.

    With ``plan`` its per-shard list ranges are the ranks' (one document
    shard per GPU of the host); with ``ranges`` exactly those (contiguous,
    e.g. ``rank_ranges_within`` a document shard's lists: the ranks of a
    group over one shard artifact); otherwise ``world_size`` ranges from
    ``rank_list_ranges``. Each file is written atomically
    (``write_artifact``); the manifest is renamed into place last.
    """
    model_path = Path(model_path)
    kind = read_header(model_path)["kind"]
    if kind == "learned_retrieval_model":
        from sterling.model.learned import LearnedRetrievalModel

        model = LearnedRetrievalModel.load(model_path)
    else:
        from sterling.model.retrieval import RetrievalModel

        model = RetrievalModel.load(model_path)
    index = model.index
    if ranges is not None:
        ranges = [(int(a), int(b)) for a, b in ranges]
        if world_size is not None and world_size != len(ranges):
            raise InvalidInputError(f"world_size ({world_size}) disagrees with the {len(ranges)} rank ranges given")
        check_tiling(ranges, ranges[-1][1] if ranges else 0, what="rank list ranges",
                     start=ranges[0][0] if ranges else 0)
        if not ranges or ranges[-1][1] > index.nlist:
            raise InvalidInputError(f"rank list ranges {ranges} must be non-empty and within [0, {index.nlist})")
    elif plan is not None:
        if world_size is not None and world_size != plan.num_shards:
            raise InvalidInputError(
                f"--nproc-per-node {world_size} disagrees with the plan's num_shards ({plan.num_shards}); "
                "give as many ranks as the plan has shards, or re-plan"
            )
        ranges = list_ranges_from_plan(plan, index.nlist)
    else:
        if world_size is None:
            raise InvalidInputError("give the number of ranks (world_size) or a plan")
        ranges = rank_list_ranges(index, world_size, xq_sample=xq_sample, nprobe=nprobe)
    n = len(ranges)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    version = int(index.version)
    common = {"world_size": n, "capacity": index.capacity, "items": index.num_items, "source_version": version,
              "source": str(model_path)}
    off = index.list_offsets
    slices = []
    for r, (a, b) in enumerate(ranges):
        name = _rank_name(r, n)
        info = {**common, "index": r, "rank": r, "num_shards": n, "lists": [a, b]}
        if kind == "learned_retrieval_model":
            nbytes, items = _save_learned_rank(model, (a, b), r, out / name, info)
        else:
            sub = slice_model(model, (a, b))
            nbytes, items = _save_slice(sub, out / name, info), sub.index.num_items
        slices.append(ShardSlice(index=r, path=name, lists=(a, b), slots=(int(off[a]), int(off[b])), items=items,
                                 nbytes=nbytes))
    head = _rank_name(0, n)
    if kind != "learned_retrieval_model":
        head = HEAD_NAME
        _save_slice(slice_model(model, (0, 0)), out / HEAD_NAME,
                    {**common, "index": -1, "rank": -1, "num_shards": n, "lists": [0, 0]})
    manifest = ShardManifest(num_shards=n, nlist=index.nlist, dim=index.dim, source=str(model_path),
                             source_version=version, head=head, shards=tuple(slices), plan=plan_path)
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(out / MANIFEST_NAME)
    return ShardManifest.from_json(manifest.to_json(), base=out)


def _save_learned_rank(model, lists, rank: int, path: Path, info: dict) -> tuple[int, int]:
    from sterling.model.learned import EmbeddingCache, LearnedRetrievalModel

    sub = slice_index(model.index, lists)
    cache = model.cache
    if rank != 0:  # the rerank runs on rank 0 after the merge; other ranks keep an empty cache of the right width
        c = cache.data.shape[1]
        cache = EmbeddingCache(torch.empty(0, dtype=torch.int64), cache.data.new_empty(0, c), torch.empty(0))
    part = LearnedRetrievalModel(
        index=sub, user_tower=model.user_tower, overarch=model.overarch, heads=model.heads, cache=cache,
        users=model.users if rank == 0 else None, item_tower=None, value_formula=model.value_model.default,
        k0=model.k0, extra_meta={**model.extra_meta, "rank": info},
    )
    part.save(path)
    nbytes = sum(t.numel() * t.element_size() for t in part.state_dict().values())
    return nbytes, sub.num_items


def read_rank_manifest(path: str | Path) -> ShardManifest:
    """``read_manifest`` for a rank directory (paths come back absolute)."""
    return read_manifest(path)
