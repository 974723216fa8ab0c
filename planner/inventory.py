"""Tensor inventory of a retrieval model: bytes stored and bytes touched per query.

Built either from a model config (``IndexModelConfig``) or from a saved
artifact's header (``inventory_from_header``). Sizes follow the item-index
layout of ``ItemIndex`` (its buffers, ``model/index.py``). Per-query bytes, with ``p = nprobe / nlist`` the
fraction of the catalog a query scans:

====================  ==========================  =========================
tensor                bytes stored                bytes touched per query
====================  ==========================  =========================
centroids             nlist·D·4                   nlist·D·4 / batch
list_offsets          (nlist+1)·8                 nprobe·16
codes                 N·D·bits/8                  p·stored
scales                N·4                         p·stored
bloom                 N·bloom_bits/8              p·stored (probe-then-filter)
alive                 N/8                         p·stored
item_ids              N·8                         K0 sectors
attr_ids/offsets      N·a·4 + (N+1)·8             K0 · (row + offset) sectors
embedding cache       N·cache_dim·cache_bits/8    K0 rows
tower / OverArch      params·4                    stored / batch
sparse tables         rows·dim·bytes              pooling rows
====================  ==========================  =========================

Random gathers are rounded up to the 32-byte DRAM sector a GPU reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sterling.planner import errors
from sterling.planner.types import AccessPattern, TensorRole, TensorSpec

__all__ = [
    "GATHER_SECTOR_BYTES",
    "BLOOM_TARGET_FPR",
    "SparseTableSpec",
    "IndexModelConfig",
    "bloom_bits_per_item",
    "default_nlist",
    "inventory_from_config",
    "inventory_from_header",
    "sparse_tables_from_yaml",
]

# Minimum bytes a random read moves: one 32-byte sector of GPU DRAM
# (CUDA C++ Best Practices Guide, "Coalesced Access to Global Memory").
GATHER_SECTOR_BYTES: int = 32
# Bloom false-positive target per term, from the issue; exact verification
# removes the survivors' false positives anyway.
BLOOM_TARGET_FPR: float = 1e-3
# Bloom rows are packed in 64-bit words.
BLOOM_WORD_BITS: int = 64


def bloom_bits_per_item(attrs_per_item: int, fpr: float = BLOOM_TARGET_FPR) -> int:
    """Optimal Bloom width m = -n·ln(p)/ln(2)², rounded up to whole 64-bit words.

    Example: 10 attributes at p = 1e-3 → 143.8 bits → 192 bits (24 bytes).
    """
    if attrs_per_item <= 0:
        return 0
    if not 0.0 < fpr < 1.0:
        raise errors.InvalidPlanConfigError(f"bloom fpr ({fpr}) must be in (0, 1)")
    m = -attrs_per_item * math.log(fpr) / (math.log(2) ** 2)
    return int(math.ceil(m / BLOOM_WORD_BITS)) * BLOOM_WORD_BITS


def default_nlist(items: int) -> int:
    """4·√N lists, Faiss's lower rule of thumb (Faiss wiki "Guidelines to choose an index")."""
    return max(1, min(items, int(round(4 * math.sqrt(items)))))


def _gather(rows: float, row_bytes: float) -> float:
    """Bytes moved by ``rows`` random reads of ``row_bytes`` each."""
    if row_bytes <= 0:
        return 0.0
    return rows * math.ceil(row_bytes / GATHER_SECTOR_BYTES) * GATHER_SECTOR_BYTES


@dataclass(frozen=True, kw_only=True, slots=True)
class SparseTableSpec:
    """A user-side embedding table (planned by TorchRec when it is installed)."""

    name: str
    num_embeddings: int
    embedding_dim: int
    pooling_factor: float = 1.0
    bytes_per_value: int = 4

    def __post_init__(self) -> None:
        if self.num_embeddings < 1 or self.embedding_dim < 1:
            raise errors.InvalidPlanConfigError(
                f"sparse table {self.name!r}: num_embeddings ({self.num_embeddings}) and "
                f"embedding_dim ({self.embedding_dim}) must be >= 1"
            )

    @property
    def nbytes(self) -> int:
        return self.num_embeddings * self.embedding_dim * self.bytes_per_value


@dataclass(frozen=True, kw_only=True, slots=True)
class IndexModelConfig:
    """What the planner needs to know about a retrieval model.

    Defaults follow the SilverTorch paper where it gives a number: nprobe 32
    (recall study), K0 10,000 ("in practice we use top-k around 10,000"),
    batch 16 (ANN benchmark). ``capacity_slack`` is the per-list free space
    kept for upserts (N_cap = N·(1+slack)). ``cache_dim`` (default: ``dim``,
    0 for none) sizes the fp16 item-embedding cache the OverArch / exact
    re-scoring reads for the K0 candidates.
    """

    items: int
    dim: int
    nlist: int | None = None
    nprobe: int = 32
    k0: int = 10_000
    k: int = 1_000
    batch: int = 16
    code_bits: int = 8
    attrs_per_item: int = 10
    bloom_fpr: float = BLOOM_TARGET_FPR
    capacity_slack: float = 0.0
    cache_dim: int | None = None
    cache_bits: int = 16
    tower_params: int = 2_000_000
    overarch_params: int = 0
    sparse_tables: tuple[SparseTableSpec, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise errors.InvalidPlanConfigError(msg)

        if self.items < 1:
            bad(f"items ({self.items}) must be >= 1")
        if self.dim < 1:
            bad(f"dim ({self.dim}) must be >= 1")
        if self.code_bits not in (4, 8, 16, 32):
            bad(f"code_bits ({self.code_bits}) must be 4, 8, 16 or 32")
        if self.nlist is not None and not 1 <= self.nlist <= self.items:
            bad(f"nlist ({self.nlist}) must be in [1, items={self.items}]")
        if self.nprobe < 1 or self.nprobe > self.resolved_nlist:
            bad(f"nprobe ({self.nprobe}) must be in [1, nlist={self.resolved_nlist}]")
        if self.k0 < 1 or self.batch < 1 or self.k < 1:
            bad(f"k0 ({self.k0}), k ({self.k}) and batch ({self.batch}) must be >= 1")
        if self.attrs_per_item < 0 or (self.cache_dim or 0) < 0 or self.capacity_slack < 0:
            bad("attrs_per_item, cache_dim and capacity_slack must be >= 0")
        if self.tower_params < 0 or self.overarch_params < 0:
            bad("tower_params and overarch_params must be >= 0")

    @property
    def resolved_nlist(self) -> int:
        return self.nlist if self.nlist is not None else default_nlist(self.items)

    @property
    def resolved_cache_dim(self) -> int:
        return self.dim if self.cache_dim is None else self.cache_dim

    @property
    def n_cap(self) -> int:
        return int(math.ceil(self.items * (1.0 + self.capacity_slack)))


def inventory_from_config(cfg: IndexModelConfig) -> tuple[TensorSpec, ...]:
    """Every tensor of the model for the whole catalog (see the module table)."""
    nlist = cfg.resolved_nlist
    n = cfg.n_cap
    d = cfg.dim
    p = cfg.nprobe / nlist
    k0 = min(cfg.k0, cfg.items)
    out: list[TensorSpec] = []

    def sharded_scan(name: str, nbytes: int, shape: tuple[int, ...], dtype: str) -> None:
        out.append(TensorSpec(
            name=name, nbytes=nbytes, bytes_per_query=nbytes * p,
            access=AccessPattern.PROBED, role=TensorRole.SHARDED, scan_path=True,
            shape=shape, dtype=dtype,
        ))

    def gathered(name: str, nbytes: int, row_bytes: float, shape: tuple[int, ...], dtype: str) -> None:
        out.append(TensorSpec(
            name=name, nbytes=nbytes, bytes_per_query=_gather(k0, row_bytes),
            access=AccessPattern.GATHERED, role=TensorRole.SHARDED,
            shape=shape, dtype=dtype,
        ))

    def weights(name: str, nbytes: int, shape: tuple[int, ...], dtype: str) -> None:
        out.append(TensorSpec(
            name=name, nbytes=nbytes, bytes_per_query=nbytes / cfg.batch,
            access=AccessPattern.PER_BATCH, role=TensorRole.REPLICATED,
            shape=shape, dtype=dtype,
        ))

    weights("centroids", nlist * d * 4, (nlist, d), "float32")
    out.append(TensorSpec(
        name="list_offsets", nbytes=(nlist + 1) * 8, bytes_per_query=cfg.nprobe * 16.0,
        access=AccessPattern.PROBED, role=TensorRole.SHARDED, scan_path=True,
        shape=(nlist + 1,), dtype="int64",
    ))
    code_dtype = {4: "int4", 8: "int8", 16: "float16", 32: "float32"}[cfg.code_bits]
    sharded_scan("codes", n * d * cfg.code_bits // 8, (n, d), code_dtype)
    if cfg.code_bits <= 8:
        sharded_scan("scales", n * 4, (n,), "float32")
    bloom_bits = bloom_bits_per_item(cfg.attrs_per_item, cfg.bloom_fpr)
    if bloom_bits:
        sharded_scan("bloom", n * bloom_bits // 8, (n, bloom_bits // 64), "int64")
    sharded_scan("alive", (n + 7) // 8, ((n + 7) // 8,), "uint8")
    gathered("item_ids", n * 8, 8, (n,), "int64")
    if cfg.attrs_per_item:
        a = cfg.attrs_per_item
        gathered("attr_ids", n * a * 4, a * 4, (n * a,), "int32")
        gathered("attr_offsets", (n + 1) * 8, 8, (n + 1,), "int64")
    if cfg.resolved_cache_dim:
        cdim = cfg.resolved_cache_dim
        row = cdim * cfg.cache_bits / 8
        cdtype = {8: "int8", 16: "float16", 32: "float32"}.get(cfg.cache_bits, f"{cfg.cache_bits}bit")
        gathered("embedding_cache", int(n * row), row, (n, cdim), cdtype)
    if cfg.tower_params:
        weights("tower", cfg.tower_params * 4, (cfg.tower_params,), "float32")
    if cfg.overarch_params:
        weights("overarch", cfg.overarch_params * 4, (cfg.overarch_params,), "float32")
    for t in cfg.sparse_tables:
        out.append(TensorSpec(
            name=f"sparse.{t.name}", nbytes=t.nbytes,
            bytes_per_query=_gather(t.pooling_factor, t.embedding_dim * t.bytes_per_value),
            access=AccessPattern.LOOKUP, role=TensorRole.SPARSE,
            shape=(t.num_embeddings, t.embedding_dim), dtype=f"{8 * t.bytes_per_value}bit",
        ))
    return tuple(out)


_DTYPE_BYTES: dict[str, float] = {
    "int8": 1, "uint8": 1, "bool": 1, "int16": 2, "float16": 2, "bfloat16": 2,
    "int32": 4, "float32": 4, "int64": 8, "float64": 8,
}
_SCAN_TENSORS = {"codes", "scales", "bloom", "alive", "list_offsets"}
_GATHER_TENSORS = {"item_ids", "attr_ids", "attr_offsets", "embedding_cache"}


def inventory_from_header(
    header: Mapping[str, Any], *, nprobe: int, k0: int, batch: int
) -> tuple[IndexModelConfig, tuple[TensorSpec, ...]]:
    """Inventory of a saved artifact, from ``sterling.model.artifact.read_header``.

    Item-index tensors are named ``<buffer>`` in an ``item_index`` artifact and
    ``index.<buffer>`` in a model artifact; everything
    else (``tower.*`` …) is treated as replicated weights read once per batch.
    Returns the config the header describes (for the cost model) and the specs.
    """
    # An ``item_index`` artifact names its buffers bare; a model artifact prefixes them.
    prefix = "" if header.get("kind") == "item_index" else "index."
    tensors = [
        {**t, "name": "index." + t["name"]} if prefix == "" else t
        for t in header.get("tensors", [])
    ]
    by_name = {t["name"]: t for t in tensors}
    codes = by_name.get("index.codes")
    if codes is None:
        raise errors.InvalidPlanConfigError("artifact has no index.codes tensor; is it a Sterling index?")
    n_cap, dim = int(codes["shape"][0]), int(codes["shape"][1])
    cent = by_name.get("index.centroids")
    nlist = int(cent["shape"][0]) if cent else default_nlist(n_cap)
    items = n_cap  # slots, including any per-list slack
    cfg = IndexModelConfig(
        items=items, dim=dim, nlist=min(nlist, items),
        nprobe=min(nprobe, nlist), k0=k0, batch=batch, tower_params=0, attrs_per_item=0,
        cache_dim=0,
    )
    p = cfg.nprobe / nlist
    k0_eff = min(k0, n_cap)
    specs: list[TensorSpec] = []
    for t in tensors:
        name: str = t["name"]
        nbytes = int(t["nbytes"])
        shape = tuple(int(x) for x in t["shape"])
        dtype = str(t["dtype"]).removeprefix("torch.")
        short = name.removeprefix("index.")
        if name.startswith("index.") and short in _SCAN_TENSORS:
            bpq = cfg.nprobe * 16.0 if short == "list_offsets" else nbytes * p
            specs.append(TensorSpec(
                name=short, nbytes=nbytes, bytes_per_query=bpq, access=AccessPattern.PROBED,
                role=TensorRole.SHARDED, scan_path=True, shape=shape, dtype=dtype,
            ))
        elif name.startswith("index.") and (short in _GATHER_TENSORS or (shape and shape[0] >= n_cap)):
            rows = shape[0] if shape else 1
            row_bytes = nbytes / max(1, rows)
            if short == "attr_ids":
                row_bytes = nbytes / max(1, n_cap)
            specs.append(TensorSpec(
                name=short, nbytes=nbytes, bytes_per_query=_gather(k0_eff, row_bytes),
                access=AccessPattern.GATHERED, role=TensorRole.SHARDED, shape=shape, dtype=dtype,
            ))
        else:
            specs.append(TensorSpec(
                name=short, nbytes=nbytes, bytes_per_query=nbytes / batch,
                access=AccessPattern.PER_BATCH, role=TensorRole.REPLICATED, shape=shape, dtype=dtype,
            ))
    return cfg, tuple(specs)


def sparse_tables_from_yaml(data: Any) -> tuple[SparseTableSpec, ...]:
    """Parse ``tables: [{name, num_embeddings, embedding_dim, pooling_factor, dtype}]``.

    ``rows`` / ``dim`` / ``pooling`` are accepted as short names; ``dtype`` is
    ``fp32`` (default), ``fp16`` or ``int8``.
    """
    if isinstance(data, Mapping):
        data = data.get("tables", [])
    if not isinstance(data, Iterable) or isinstance(data, (str, bytes)):
        raise errors.InvalidPlanConfigError("sparse tables YAML must be a list or {tables: [...]}")
    sizes = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "int8": 1}
    out = []
    for i, t in enumerate(data):
        if not isinstance(t, Mapping):
            raise errors.InvalidPlanConfigError(f"sparse table #{i} must be a mapping, got {t!r}")
        try:
            dtype = str(t.get("dtype", "fp32")).lower()
            if dtype not in sizes:
                raise errors.InvalidPlanConfigError(
                    f"sparse table #{i}: dtype {dtype!r} not one of {sorted(sizes)}"
                )
            out.append(SparseTableSpec(
                name=str(t.get("name", f"table_{i}")),
                num_embeddings=int(t.get("num_embeddings", t.get("rows", 0))),
                embedding_dim=int(t.get("embedding_dim", t.get("dim", 0))),
                pooling_factor=float(t.get("pooling_factor", t.get("pooling", 1.0))),
                bytes_per_value=sizes[dtype],
            ))
        except (TypeError, ValueError) as e:
            raise errors.InvalidPlanConfigError(f"sparse table #{i} is malformed: {e}") from e
    return tuple(out)
