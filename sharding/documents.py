"""Document sharding: cut one model artifact into per-shard slices by whole IVF lists.

A document shard owns a contiguous range of IVF lists ``[a, b)``. Slots are
cluster-contiguous, so it owns the contiguous slot range
``[list_offsets[a], list_offsets[b])``. A slice keeps **all** centroids and a
``list_offsets`` in which every list it does not own is empty: the probe
(top-``nprobe`` lists by query·centroid) is then the same on every shard as
in the single-process model, each shard scans only its own lists, and the
per-shard top-k merged by (score desc, shard, rank) is exactly the
single-process top-k (ties within a shard are ordered by slot, and shards
are in slot order).

Every slice is a normal ``retrieval_model`` artifact (``RetrievalModel.load``
reads it unchanged, memory-mapped) with ``meta["shard"]`` describing it; a
*head* slice (no lists at all) carries the centroids, the tower, the
vocabulary and the config for the router.

Example:
    >>> manifest = write_shards("model.st", "shards/", num_shards=4)
    >>> [s.lists for s in manifest.shards]
    [(0, 17), (17, 33), (33, 48), (48, 64)]
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sterling.kernels.bits import pack_bits, unpack_bits_range
from sterling.model.artifact import read_header, write_artifact
from sterling.model.errors import ArtifactError, InvalidInputError
from sterling.model.index import ItemIndex
from sterling.model.retrieval import RetrievalModel

__all__ = [
    "MANIFEST_NAME",
    "HEAD_NAME",
    "ShardSlice",
    "ShardManifest",
    "list_bytes",
    "balanced_list_ranges",
    "cut_ranges",
    "list_ranges_from_plan",
    "check_tiling",
    "slice_index",
    "slice_model",
    "write_shards",
    "read_manifest",
    "shard_info",
]

MANIFEST_NAME = "manifest.json"
HEAD_NAME = "head.st"
MANIFEST_FORMAT = 1


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardSlice:
    """One shard artifact: IVF lists ``[lists[0], lists[1])``, ``items`` live items, ``nbytes`` of tensors."""

    index: int
    path: str
    lists: tuple[int, int]
    slots: tuple[int, int]
    items: int
    nbytes: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ShardManifest:
    """What ``sterling shard`` wrote: the head artifact, every shard, and where they came from."""

    num_shards: int
    nlist: int
    dim: int
    source: str
    source_version: int
    head: str
    shards: tuple[ShardSlice, ...]
    plan: str | None = None

    def to_json(self) -> str:
        d = asdict(self)
        d["format_version"] = MANIFEST_FORMAT
        return json.dumps(d, indent=1)

    @classmethod
    def from_json(cls, text: str, *, base: Path | None = None) -> ShardManifest:
        d = json.loads(text)
        if d.get("format_version") != MANIFEST_FORMAT:
            raise ArtifactError(
                f"shard manifest format {d.get('format_version')!r} is not supported "
                f"(this Sterling reads {MANIFEST_FORMAT}); re-run `sterling shard`"
            )
        d.pop("format_version")

        def resolve(p: str) -> str:
            return str(base / p) if base is not None and not Path(p).is_absolute() else p

        shards = tuple(
            ShardSlice(**{**s, "path": resolve(s["path"]), "lists": tuple(s["lists"]), "slots": tuple(s["slots"])})
            for s in d.pop("shards")
        )
        d["head"] = resolve(d["head"])
        return cls(**d, shards=shards)


def list_bytes(index: ItemIndex) -> torch.Tensor:
    """[nlist] int64: bytes of the per-slot tensors each IVF list holds (codes, scales, ids, Bloom, attributes, alive)."""
    off = index.list_offsets
    sizes = off[1:] - off[:-1]
    per_slot = index.codes.shape[1] * index.codes.element_size()
    per_slot += index.scales.element_size() + index.item_ids.element_size()
    if index.bloom.ndim == 2 and index.bloom.shape[0] == index.capacity:
        per_slot += index.bloom.shape[1] * index.bloom.element_size()
    attr = index.attr_offsets[off] * index.attr_ids.element_size()  # [nlist + 1] attribute bytes before each list
    return sizes * (per_slot + index.attr_offsets.element_size()) + (attr[1:] - attr[:-1]) + sizes // 8


def balanced_list_ranges(index: ItemIndex, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ranges of whole IVF lists, one per shard, balanced by bytes.

    Cuts at the list boundary nearest each ``i / num_shards`` of the total
    bytes, keeping at least one list per shard.
    """
    return cut_ranges(list_bytes(index), num_shards)


def cut_ranges(cost: torch.Tensor, num_shards: int) -> list[tuple[int, int]]:
    """Contiguous ranges over ``len(cost)`` lists, one per shard, each near ``1 / num_shards`` of Σ cost.

    Cuts at the list boundary nearest each ``i / num_shards`` of the total,
    keeping at least one list per shard.
    """
    nlist = int(cost.shape[0])
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
        raise InvalidInputError(f"num_shards ({num_shards!r}) must be an integer ≥ 1")
    if num_shards > nlist:
        raise InvalidInputError(
            f"num_shards ({num_shards}) exceeds nlist ({nlist}): a shard owns whole IVF lists; "
            f"use at most {nlist} shards or rebuild with a larger nlist"
        )
    cum = torch.cat([torch.zeros(1, dtype=cost.dtype), cost.cumsum(0)]).double()
    total = float(cum[-1])
    cuts = [0]
    for i in range(1, num_shards):
        target = total * i / num_shards
        c = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)))
        if c > 0 and abs(float(cum[c - 1]) - target) <= abs(float(cum[min(c, nlist)]) - target):
            c -= 1
        lo, hi = cuts[-1] + 1, nlist - (num_shards - i)
        cuts.append(min(max(c, lo), hi))
    cuts.append(nlist)
    return [(cuts[i], cuts[i + 1]) for i in range(num_shards)]


def list_ranges_from_plan(plan, nlist: int) -> list[tuple[int, int]]:
    """The plan's per-shard list ranges, checked to tile ``[0, nlist)`` exactly."""
    shards = sorted(plan.shards, key=lambda s: s.shard)
    if plan.nlist != nlist:
        raise InvalidInputError(
            f"the plan was made for nlist={plan.nlist} but the model has nlist={nlist}; "
            "re-run `sterling plan --model <artifact>` for this model"
        )
    ranges = [(int(s.list_start), int(s.list_end)) for s in shards]
    if [s.shard for s in shards] != list(range(plan.num_shards)):
        raise InvalidInputError(f"plan shards {[s.shard for s in shards]} are not 0..{plan.num_shards - 1}")
    return check_tiling(ranges, nlist, what="plan shard list ranges")


def check_tiling(ranges: list[tuple[int, int]], nlist: int, *, what: str = "shard list ranges",
                 start: int = 0) -> list[tuple[int, int]]:
    """``ranges`` checked to be non-empty, contiguous and to cover ``[start, nlist)`` exactly."""
    expect = start
    for a, b in ranges:
        if a != expect or b <= a:
            raise InvalidInputError(
                f"{what} {ranges} must be non-empty, contiguous and cover [{start}, {nlist})"
            )
        expect = b
    if expect != nlist:
        raise InvalidInputError(f"{what} {ranges} end at {expect}, not at {nlist}")
    return ranges


def slice_index(index: ItemIndex, lists: tuple[int, int]) -> ItemIndex:
    """The index restricted to IVF lists ``[a, b)`` (views of ``index`` where possible).

    Keeps every centroid; lists outside ``[a, b)`` are empty in the slice's
    ``list_offsets``, so probing is global and scanning is local.
    """
    a, b = int(lists[0]), int(lists[1])
    if not 0 <= a <= b <= index.nlist:
        raise InvalidInputError(f"list range [{a}, {b}) is not inside [0, {index.nlist})")
    off = index.list_offsets
    s0, e0 = int(off[a]), int(off[b])
    n = e0 - s0
    if index.bloom.shape[0] != index.capacity:
        raise ArtifactError(
            f"cannot slice a Bloom buffer of shape {tuple(index.bloom.shape)} by slots (capacity "
            f"{index.capacity}); this sharding code handles the item-major [N_cap, W] layout"
        )
    a0, a1 = int(index.attr_offsets[s0]), int(index.attr_offsets[e0])
    tensors = {
        "centroids": index.centroids,
        "list_offsets": (off - s0).clamp(0, n).contiguous(),
        "codes": index.codes[s0:e0],
        "scales": index.scales[s0:e0],
        "item_ids": index.item_ids[s0:e0],
        "bloom": index.bloom[s0:e0],
        "attr_ids": index.attr_ids[a0:a1],
        "attr_offsets": index.attr_offsets[s0 : e0 + 1] - a0,
        "alive": pack_bits(unpack_bits_range(index.alive, s0, e0)),
        "version": index.version.clone(),
    }
    return ItemIndex.from_parts(index.meta(), tensors)


def slice_model(model: RetrievalModel, lists: tuple[int, int]) -> RetrievalModel:
    """A ``RetrievalModel`` over one shard's lists, sharing the tower."""
    return RetrievalModel(slice_index(model.index, lists), model.tower)


def _save_slice(model: RetrievalModel, path: Path, shard_meta: dict) -> int:
    tensors = {f"index.{n}": t for n, t in model.index.tensors().items()}
    meta: dict = {"index": model.index.meta(), "tower": None, "shard": shard_meta}
    if model.tower is not None:
        tensors.update({f"tower.{n}": t for n, t in model.tower.state_dict().items()})
        meta["tower"] = asdict(model.tower.config)
    write_artifact(path, kind="retrieval_model", meta=meta, tensors=tensors)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _document_model(path: Path) -> RetrievalModel:
    """The part of an artifact that document shards hold: a ``RetrievalModel``'s whole model,
    or a learned model's item index (its towers, OverArch and heads stay with the router)."""
    from sterling.model.artifact import read_header

    if read_header(path).get("kind") == "learned_retrieval_model":
        from sterling.model.learned import LearnedRetrievalModel

        return RetrievalModel(LearnedRetrievalModel.load(path).index)
    return RetrievalModel.load(path)


def write_shards(
    model_path: str | Path,
    out_dir: str | Path,
    *,
    num_shards: int | None = None,
    plan=None,
    plan_path: str | None = None,
    ranges: list[tuple[int, int]] | None = None,
) -> ShardManifest:
    """Write ``shard-XXXX.st`` per shard, ``head.st`` and ``manifest.json`` into ``out_dir``.

    With ``plan`` (a ``sterling.planner.Plan``) the plan's list ranges are
    used; with ``ranges`` exactly those (contiguous, tiling ``[0, nlist)``:
    e.g. one range per plan host, the union of its GPUs' shards); otherwise
    ``num_shards`` ranges balanced by bytes.
    """
    model_path = Path(model_path)
    out = Path(out_dir)
    model = _document_model(model_path)
    index = model.index
    if ranges is not None:
        ranges = check_tiling([(int(a), int(b)) for a, b in ranges], index.nlist)
    elif plan is not None:
        if num_shards is not None and num_shards != plan.num_shards:
            raise InvalidInputError(
                f"--shards {num_shards} disagrees with the plan's num_shards ({plan.num_shards}); drop one"
            )
        ranges = list_ranges_from_plan(plan, index.nlist)
    else:
        if num_shards is None:
            raise InvalidInputError("give the number of shards (--shards N) or a plan (--plan plan.json)")
        ranges = balanced_list_ranges(index, num_shards)
    version = int(index.version)
    n = len(ranges)
    out.mkdir(parents=True, exist_ok=True)
    slices = []
    for i, (a, b) in enumerate(ranges):
        sub = slice_model(model, (a, b))
        name = f"shard-{i:04d}-of-{n:04d}.st"
        meta = {"index": i, "num_shards": n, "lists": [a, b], "source_version": version, "source": str(model_path)}
        nbytes = _save_slice(sub, out / name, meta)
        off = index.list_offsets
        slices.append(
            ShardSlice(
                index=i, path=name, lists=(a, b), slots=(int(off[a]), int(off[b])),
                items=sub.index.num_items, nbytes=nbytes,
            )
        )
    head = slice_model(model, (0, 0))
    _save_slice(head, out / HEAD_NAME, {"index": -1, "num_shards": n, "lists": [0, 0], "source_version": version,
                                         "source": str(model_path)})
    manifest = ShardManifest(
        num_shards=n, nlist=index.nlist, dim=index.dim, source=str(model_path), source_version=version,
        head=HEAD_NAME, shards=tuple(slices), plan=plan_path,
    )
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.to_json())
    tmp.replace(out / MANIFEST_NAME)
    return ShardManifest.from_json(manifest.to_json(), base=out)


def read_manifest(path: str | Path) -> ShardManifest:
    """Read ``manifest.json`` (or the directory holding it); shard paths come back absolute."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.exists():
        raise ArtifactError(f"shard manifest {p} does not exist; write shards with `sterling shard`")
    return ShardManifest.from_json(p.read_text(), base=p.parent)


def shard_info(path: str | Path) -> dict | None:
    """``meta["shard"]`` of an artifact, or ``None`` for an unsharded model."""
    return read_header(path)["meta"].get("shard")
