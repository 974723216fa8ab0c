"""``LearnedRetrievalModel``: Index as Model, end to end, as one ``nn.Module``.

user features (KJT + dense, or a user id looked up in the shipped users
table) → user tower → ``ItemIndex`` search for K0 candidates (filters,
probe-then-filter, exact check) → cached item-side rows → OverArch → task
heads → Value Model → top-k ids, values, per-task scores, model version.

The index, the embedding cache and the users table are buffers; gradients
flow from the heads through the OverArch into the user tower. A bare query
embedding is still accepted (the tower is skipped); ``RetrievalModel`` is
unchanged for models without towers.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from sterling.model.artifact import read_artifact, write_artifact
from sterling.model.data import ItemInputs, csr_take
from sterling.model.errors import ArtifactError, InvalidInputError
from sterling.model.heads import TaskHeads
from sterling.model.index import ItemIndex
from sterling.model.overarch import OverArch, overarch_from_meta, overarch_meta
from sterling.model.stages import staged
from sterling.model.towers import Tower, make_kjt
from sterling.model.value_model import ValueModel

__all__ = ["CachePlan", "EmbeddingCache", "ItemInputs", "UserTable", "LearnedOutput", "LearnedRetrievalModel", "CACHE_DTYPES"]

CACHE_DTYPES = ("fp32", "bf16", "int8")


class EmbeddingCache(nn.Module):
    """Item-side OverArch rows as buffers, next to the index: fp32, bf16, or int8 + per-row scale.

    Rows are found by external id: ``ids`` [N] is sorted and row ``i`` of
    ``data`` belongs to ``ids[i]`` (the build's layout). Streaming upserts
    (``plan_upsert`` / ``apply``) change rows in place; a new item takes a
    free row past the sorted part (``data`` has reserved capacity) and is
    found through ``delta_ids`` (sorted) → ``delta_rows``. A delete clears
    the row's ``live`` flag. When the free rows run out, the plan carries a
    re-layout (every live row, sorted, with fresh spare capacity) that
    ``apply`` swaps in whole. Readers never see a half-applied plan as long
    as ``apply`` runs under the writer side of the caller's guard.
    """

    ids: torch.Tensor  # [N] int64, sorted (rows 0..N-1)
    data: torch.Tensor  # [cap, C] fp32 | bf16 | int8, cap ≥ N + len(delta_ids)
    scale: torch.Tensor  # [cap] fp32 (ones unless int8)
    live: torch.Tensor  # [cap] bool: row holds a current item
    delta_ids: torch.Tensor  # [M] int64, sorted: items added since the layout
    delta_rows: torch.Tensor  # [M] int64: their rows (N ≤ row < cap)

    def __init__(self, ids: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, live: torch.Tensor | None = None,
                 delta_ids: torch.Tensor | None = None, delta_rows: torch.Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("ids", ids)
        self.register_buffer("data", data)
        self.register_buffer("scale", scale)
        self.register_buffer("live", torch.ones(data.shape[0], dtype=torch.bool) if live is None else live)
        empty = torch.zeros(0, dtype=torch.int64)
        self.register_buffer("delta_ids", empty if delta_ids is None else delta_ids)
        self.register_buffer("delta_rows", empty.clone() if delta_rows is None else delta_rows)
        self._refresh()

    def _refresh(self) -> None:
        """Python-side summary of the buffers: rows in use, and whether the lookup may skip ``live``."""
        self._used = int(self.ids.numel() + self.delta_ids.numel())
        self._all_live = bool(self.live[: self._used].all()) and self.data.shape[0] >= self._used

    @staticmethod
    def encode(x: torch.Tensor, dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
        """[n, C] fp32 rows → (stored rows, [n] scales) in the cache's format."""
        if dtype not in CACHE_DTYPES:
            raise InvalidInputError(f"cache dtype {dtype!r} is not supported; use one of {CACHE_DTYPES}")
        x = x.detach().to(torch.float32)
        scale = torch.ones(len(x))
        if dtype == "fp32":
            return x.contiguous(), scale
        if dtype == "bf16":
            return x.to(torch.bfloat16), scale
        scale = x.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        return torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8), scale

    @classmethod
    def build(cls, ids: torch.Tensor, x: torch.Tensor, dtype: str = "fp32") -> EmbeddingCache:
        order = torch.argsort(ids)
        data, scale = cls.encode(x[order], dtype)
        return cls(ids[order].contiguous(), data, scale)

    @property
    def dtype_name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int8: "int8"}[self.data.dtype]

    @property
    def num_items(self) -> int:
        """Items with a live row."""
        return int(self.live[: self._used].sum())

    def rows(self, ext_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[...] external ids → ([...] rows, [...] valid); −1 / unknown / deleted ids are invalid (row 0)."""
        e = ext_ids.clamp(min=0)
        N = self.ids.numel()
        if N:
            pos = torch.searchsorted(self.ids, e).clamp(max=N - 1)
            found = self.ids[pos] == e
        else:
            pos, found = torch.zeros_like(e), torch.zeros(e.shape, dtype=torch.bool)
        M = self.delta_ids.numel()
        if M:
            dp = torch.searchsorted(self.delta_ids, e).clamp(max=M - 1)
            dfound = self.delta_ids[dp] == e
            pos = torch.where(found, pos, torch.where(dfound, self.delta_rows[dp], torch.zeros_like(pos)))
            found = found | dfound
        valid = found & (ext_ids >= 0)
        if not self._all_live:
            valid &= self.live[pos]
        return torch.where(valid, pos, torch.zeros_like(pos)), valid

    def gather(self, ext_ids: torch.Tensor, *, out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, K] ids → ([B, K, C] fp32 rows, [B, K] valid).

        ``out``: a float32 buffer of at least B·K·C elements to gather an fp32 cache into
        (a fresh one of tens of MB is page-faulted in on every call; see ``GatherBuffers``).
        """
        rows, valid = self.rows(ext_ids)
        if not self.data.shape[0]:  # no rows at all (an emptied catalog): every candidate is invalid
            return torch.zeros(*ext_ids.shape, self.data.shape[1]), valid
        flat = rows.reshape(-1)
        if out is not None and self.data.dtype == torch.float32 and out.device == self.data.device:
            x = out[: flat.numel() * self.data.shape[1]].view(flat.numel(), self.data.shape[1])
            torch.index_select(self.data, 0, flat, out=x)
            return x.view(*ext_ids.shape, -1), valid
        x = torch.index_select(self.data, 0, flat)  # ~1.7× faster than advanced indexing on CPU
        if self.data.dtype == torch.int8:
            x = x.to(torch.float32) * torch.index_select(self.scale, 0, flat).unsqueeze(1)
        elif self.data.dtype != torch.float32:
            x = x.to(torch.float32)
        return x.view(*ext_ids.shape, -1), valid

    # ------------------------------------------------------------ streaming updates
    def plan_upsert(self, ids: torch.Tensor, x: torch.Tensor, *, slack: float = 0.125) -> CachePlan:
        """The change that writes rows ``x`` [n, C] (fp32, before encoding) for unique ``ids`` [n].

        Pure: reads the cache, changes nothing. Existing items (live or
        deleted) keep their row; new ones take free rows, or — when too few
        are left — the plan is a whole new layout with ``slack`` × items spare rows.
        """
        data, scale = self.encode(x, self.dtype_name)
        rows = self._rows_any(ids)
        new = rows < 0
        n_new = int(new.sum())
        if self._used + n_new > self.data.shape[0]:
            return self._relayout(ids, data, scale, slack)
        rows = rows.clone()
        rows[new] = torch.arange(self._used, self._used + n_new, dtype=torch.int64)
        d_ids, d_rows = self.delta_ids, self.delta_rows
        if n_new:
            d_ids = torch.cat([d_ids, ids[new]])
            d_rows = torch.cat([d_rows, rows[new]])
            order = torch.argsort(d_ids)
            d_ids, d_rows = d_ids[order], d_rows[order]
        return CachePlan(rows=rows, data=data, scale=scale, live=True, delta=(d_ids, d_rows))

    def plan_delete(self, ids: torch.Tensor) -> CachePlan:
        """The change that drops ``ids`` (absent ones are ignored)."""
        rows = self._rows_any(ids)
        rows = rows[rows >= 0]
        return CachePlan(rows=rows, data=None, scale=None, live=False)

    def plan_compact(self, slack: float = 0.125) -> CachePlan:
        """A fresh layout of the live rows only (memory back to a build's, plus ``slack`` spare rows)."""
        none = torch.zeros(0, dtype=torch.int64)
        return self._relayout(none, self.data[:0], self.scale[:0], slack)

    def apply(self, plan: CachePlan) -> None:
        """Install ``plan`` (call under the writer guard; the plan was made from the current state)."""
        if plan.layout is not None:
            for name, t in plan.layout.items():
                setattr(self, name, t)
        else:
            if plan.data is not None:
                self.data[plan.rows] = plan.data
                self.scale[plan.rows] = plan.scale
            self.live[plan.rows] = plan.live
            if plan.delta is not None:
                self.delta_ids, self.delta_rows = plan.delta
        self._refresh()

    def _rows_any(self, ids: torch.Tensor) -> torch.Tensor:
        """[n] row of each id, −1 where it has none (a deleted item keeps its row)."""
        ids = ids.reshape(-1).to(torch.int64)
        saved = self._all_live
        self._all_live = True
        try:
            rows, found = self.rows(ids)
        finally:
            self._all_live = saved
        return torch.where(found, rows, torch.full_like(rows, -1))

    def _relayout(self, ids: torch.Tensor, data: torch.Tensor, scale: torch.Tensor, slack: float) -> CachePlan:
        used = torch.arange(self._used, dtype=torch.int64)
        keep = used[self.live[: self._used]]
        row_id = torch.empty(self._used, dtype=torch.int64)
        row_id[: self.ids.numel()] = self.ids
        row_id[self.delta_rows] = self.delta_ids
        old_ids = row_id[keep]
        mine = ~torch.isin(old_ids, ids)
        all_ids = torch.cat([old_ids[mine], ids])
        order = torch.argsort(all_ids)
        n = int(all_ids.numel())
        cap = n + max(64, math.ceil(slack * n))
        new_data = self.data.new_zeros(cap, self.data.shape[1])
        new_data[:n] = torch.cat([self.data[keep[mine]], data])[order]
        new_scale = torch.ones(cap)
        new_scale[:n] = torch.cat([self.scale[keep[mine]], scale])[order]
        live = torch.zeros(cap, dtype=torch.bool)
        live[:n] = True
        empty = torch.zeros(0, dtype=torch.int64)
        layout = {"ids": all_ids[order].contiguous(), "data": new_data, "scale": new_scale, "live": live,
                  "delta_ids": empty, "delta_rows": empty.clone()}
        return CachePlan(rows=empty, data=None, scale=None, live=True, layout=layout)


@dataclass(frozen=True, slots=True)
class CachePlan:
    """One batch's change to an ``EmbeddingCache`` (``plan_upsert`` / ``plan_delete``), applied by ``apply``.

    Either rows written in place (``rows`` [n], ``data`` [n, C] / ``scale``
    [n] or ``None`` for a delete, the ``live`` flag they get, the new delta
    lookup) or, when ``layout`` is set, a whole new set of buffers.
    """

    rows: torch.Tensor
    data: torch.Tensor | None
    scale: torch.Tensor | None
    live: bool
    delta: tuple[torch.Tensor, torch.Tensor] | None = None
    layout: dict[str, torch.Tensor] | None = None


class UserTable(nn.Module):
    """The users table shipped in the artifact: id → the user tower's inputs (vocabulary rows already mapped)."""

    def __init__(self, ids: torch.Tensor, keys: list[str], sparse: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 dense: torch.Tensor | None) -> None:
        super().__init__()
        order = torch.argsort(ids)
        self.keys = list(keys)
        self.register_buffer("ids", ids[order].contiguous())
        self.register_buffer("order", order)
        for k in keys:
            self.register_buffer(f"v_{k}", sparse[k][0])
            self.register_buffer(f"o_{k}", sparse[k][1])
        self.register_buffer("dense", dense if dense is not None else torch.zeros(len(ids), 0))

    def rows(self, user_ids: torch.Tensor) -> torch.Tensor:
        pos = torch.searchsorted(self.ids, user_ids).clamp(max=len(self.ids) - 1)
        return torch.where(self.ids[pos] == user_ids, self.order[pos], torch.full_like(pos, -1))

    def inputs(self, user_ids) -> tuple[object, torch.Tensor | None]:
        """(KJT, [B, dense] or None) for these user ids; an unknown user gets empty bags and zero dense."""
        rows = self.rows(torch.as_tensor(user_ids, dtype=torch.int64).reshape(-1)).numpy()
        vals, lens = [], []
        for k in self.keys:
            v, ln = csr_take(getattr(self, f"v_{k}").numpy(), getattr(self, f"o_{k}").numpy(), rows)
            vals.append(v)
            lens.append(ln)
        dense = None
        if self.dense.shape[1]:
            dense = self.dense[torch.from_numpy(np.maximum(rows, 0))] * torch.from_numpy(rows >= 0)[:, None]
        return make_kjt(self.keys, vals, lens), dense


def nprobe_for_k0(k0: int, *, capacity: int, nlist: int, default: int) -> int:
    """Lists to probe so that about 2·K0 of ``capacity`` slots in ``nlist`` lists are scanned (≥ ``default``)."""
    per_list = max(1, capacity // max(nlist, 1))
    return int(min(nlist, max(default, math.ceil(2 * k0 / per_list))))


class LearnedOutput(NamedTuple):
    ids: torch.Tensor  # [B, k] int64, −1 padded
    values: torch.Tensor  # [B, k] fp32 Value Model scores, −inf padded
    task_scores: torch.Tensor  # [B, k, T] σ(logit) per task
    version: int
    ann_ids: torch.Tensor  # [B, K0] the index's candidates
    ann_scores: torch.Tensor  # [B, K0]


class GatherBuffers:
    """Reused float32 buffers for the rows a serving rerank gathers from the cache.

    A batch of 64 users × 10,000 candidates × 145 floats is 370 MB; a fresh
    allocation above glibc's mmap threshold is page-faulted in on every call
    (13.3 ms against 2.4 ms into a buffer already mapped, for a 46 MB MoL gather).
    At most ``keep`` buffers of at most ``max_bytes`` each are kept; a larger
    request gets a one-off buffer. Thread-safe: concurrent calls take different ones.
    """

    def __init__(self, keep: int = 2, max_bytes: int = 1 << 29) -> None:
        self.keep, self.max_bytes = keep, max_bytes
        self._free: list[torch.Tensor] = []
        self._lock = threading.Lock()

    def take(self, n: int, device) -> torch.Tensor:
        with self._lock:
            for i, b in enumerate(self._free):
                if b.numel() >= n and b.device == torch.device(device):
                    return self._free.pop(i)
        return torch.empty(max(n, 1), dtype=torch.float32, device=device)

    def give(self, buf: torch.Tensor) -> None:
        if buf.numel() * 4 > self.max_bytes:
            return
        with self._lock:
            self._free.append(buf)
            self._free.sort(key=lambda b: b.numel())
            while len(self._free) > self.keep:
                self._free.pop(0)  # drop the smallest

    def kept_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() * 4 for b in self._free)


_GATHER = GatherBuffers()


class LearnedRetrievalModel(nn.Module):
    """The full retrieval stage in one module.

    Example:
        >>> out = model(user_ids=[17, 42], k=100, k0=10_000, where="lang:en", value_formula="click + 2*like")
        >>> out.ids, out.values, out.task_scores  # [2, 100], [2, 100], [2, 100, T]
        >>> model.save("model.st"); model = LearnedRetrievalModel.load("model.st")
    """

    def __init__(
        self,
        *,
        index: ItemIndex,
        user_tower: Tower,
        overarch: OverArch,
        heads: TaskHeads,
        cache: EmbeddingCache,
        users: UserTable | None = None,
        item_tower: Tower | None = None,
        value_formula: str | None = None,
        k0: int = 1000,
        extra_meta: dict | None = None,
    ) -> None:
        super().__init__()
        if user_tower.config.output_dim != index.dim:
            raise InvalidInputError(
                f"user tower output_dim ({user_tower.config.output_dim}) must equal the index dimension ({index.dim})"
            )
        if cache.data.shape[1] != overarch.cache_dim:
            raise InvalidInputError(f"cache width {cache.data.shape[1]} ≠ OverArch cache_dim {overarch.cache_dim}")
        self.index, self.user_tower, self.item_tower = index, user_tower, item_tower
        self.overarch, self.heads, self.cache, self.users = overarch, heads, cache, users
        self.tasks = heads.tasks
        self.value_model = ValueModel(self.tasks, value_formula)
        self.k0 = int(k0)
        self.extra_meta = dict(extra_meta or {})

    # --------------------------------------------------------------- stages
    @staged("tower")
    def user_embedding(self, *, query=None, user_ids=None, kjt=None, dense=None) -> torch.Tensor:
        """[B, D]: a given embedding, or the user tower over a KJT (+ dense) or over users-table rows."""
        given = sum(x is not None for x in (query, user_ids, kjt))
        if given != 1:
            raise InvalidInputError("give exactly one of `query` (an embedding), `user_ids` or `kjt` user features")
        if query is not None:
            q = torch.as_tensor(query, dtype=torch.float32)
            return q[None] if q.ndim == 1 else q
        if user_ids is not None:
            if self.users is None:
                raise InvalidInputError("this model ships no users table; send user features (kjt) instead")
            kjt, dense = self.users.inputs(user_ids)
        return self.user_tower(kjt, dense)

    def nprobe_for(self, k0: int) -> int:
        """Lists to probe so that about 2·K0 items are scanned (at least the index default)."""
        return nprobe_for_k0(k0, capacity=self.index.capacity, nlist=self.index.nlist,
                             default=self.index.default_nprobe())

    def candidates(self, u: torch.Tensor, k0: int, *, nprobe=None, where=None, exact=True, adaptive=None):
        """(scores [B, K0], ids [B, K0]) from the index; the query is detached (the index is a constant)."""
        k0 = int(min(k0, max(self.index.num_items, 1)))
        return self.index.search(u.detach(), k=k0, nprobe=nprobe or self.nprobe_for(k0), where=where, exact=exact,
                                 adaptive=adaptive)

    @staged("rerank")
    def rerank_logits(
        self, u: torch.Tensor, cand_ids: torch.Tensor, prior: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """([B, K, T] task logits, [B, K] valid) for candidate ids and their [B, K] index scores.

        Differentiable in ``u`` (so in the user tower), the OverArch and the heads.
        """
        if torch.is_grad_enabled():
            x, valid = self.cache.gather(cand_ids)
            if prior is not None:
                prior = prior.masked_fill(~valid, 0.0)
            return self.heads(self.overarch(u, x, valid), prior), valid
        # serving: the gathered rows live only for this call, in a reused buffer
        need = cand_ids.numel() * self.cache.data.shape[1]
        buf = _GATHER.take(need, self.cache.data.device)
        try:
            x, valid = self.cache.gather(cand_ids, out=buf)
            if prior is not None:
                prior = prior.masked_fill(~valid, 0.0)
            return self.heads(self.overarch(u, x, valid), prior), valid
        finally:
            _GATHER.give(buf)

    def forward(
        self,
        query=None,
        *,
        user_ids=None,
        kjt=None,
        dense=None,
        k: int = 10,
        k0: int | None = None,
        nprobe: int | None = None,
        where: str | list[str | None] | None = None,
        value_formula: str | None = None,
        exact: bool = True,
        adaptive: bool | None = None,
    ) -> LearnedOutput:
        k0 = self.k0_for(k, k0)
        u = self.user_embedding(query=query, user_ids=user_ids, kjt=kjt, dense=dense)
        ann_scores, ann_ids = self.candidates(u, k0, nprobe=nprobe, where=where, exact=exact, adaptive=adaptive)
        return self.rank(u, ann_scores, ann_ids, k, value_formula)

    def k0_for(self, k: int, k0: int | None) -> int:
        """Candidates the OverArch reranks: ``k0``, or the model's default (at least k)."""
        k0 = int(k0 or max(self.k0, k))
        if k0 < k:
            raise InvalidInputError(f"k0 ({k0}) must be ≥ k ({k}): the OverArch reranks K0 candidates down to k")
        return k0

    def rank(self, u: torch.Tensor, ann_scores: torch.Tensor, ann_ids: torch.Tensor, k: int,
             value_formula: str | None = None) -> LearnedOutput:
        """OverArch + heads + Value Model over [B, K0] index candidates (−1 pads) → the top k.

        The second half of ``forward``; a router runs it on the candidates it
        merged from document shards.
        """
        logits, valid = self.rerank_logits(u, ann_ids, ann_scores)
        scores = torch.sigmoid(logits)
        values = self.value_model(scores, value_formula).masked_fill(~valid, float("-inf"))
        kk = min(k, values.shape[1])
        top_v, top_i = values.topk(kk, dim=1)
        ids = torch.gather(ann_ids, 1, top_i).masked_fill(torch.isneginf(top_v), -1)
        task_scores = torch.gather(scores, 1, top_i.unsqueeze(2).expand(-1, -1, scores.shape[2]))
        if kk < k:
            pad = k - kk
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), -1)], 1)
            top_v = torch.cat([top_v, top_v.new_full((ids.shape[0], pad), float("-inf"))], 1)
            task_scores = torch.cat([task_scores, task_scores.new_zeros(ids.shape[0], pad, scores.shape[2])], 1)
        return LearnedOutput(ids, top_v, task_scores, int(self.index.version), ann_ids, ann_scores)

    # -------------------------------------------------------- new catalogs
    def item_inputs(self, items) -> ItemInputs:
        """The item tower's inputs for the rows of ``items`` (a ``FeatureTable`` in the items-table layout).

        Sparse values go through the training vocabularies (unseen values
        share the hashed out-of-vocabulary rows); the id column is a feature
        when the tower was trained on it; dense columns are concatenated in
        table order. Raises ``DataError`` naming a missing column.
        """
        from sterling.model.data import DataError, Vocab

        if self.item_tower is None:
            raise ArtifactError("this model has no item tower to embed items with; retrain it with `sterling train`")
        vocabs = {k: Vocab.from_meta(v) for k, v in self.extra_meta.get("vocabs", {}).items()}
        vals, lens = [], []
        n = len(items)
        for key in self.item_tower.keys:
            if key == "item_id":
                raw, offs = np.asarray(items.ids), np.arange(n + 1, dtype=np.int64)
            elif key in items.sparse:
                raw, offs = items.sparse[key]
            else:
                raise DataError(f"{items.path or 'item features'}: the item tower needs sparse column {key!r}; "
                                "add it to the items table")
            if len(offs) != n + 1:
                raise DataError(f"{items.path or 'item features'}: sparse column {key!r} has {len(offs) - 1} rows "
                                f"for {n} items; give one row per item")
            vals.append(vocabs[f"item.{key}"].lookup(raw[offs[0] : offs[-1]]))
            lens.append(np.diff(offs).astype(np.int32))
        dd = self.item_tower.config.dense_dim
        dense = np.zeros((n, 0), np.float32)
        if items.dense:
            dense = np.concatenate([np.asarray(v, np.float32).reshape(n, -1) for v in items.dense.values()], axis=1)
        if dense.shape[1] != dd:
            raise DataError(f"{items.path or 'item features'}: the item tower needs {dd} dense values per item, "
                            f"the table has {dense.shape[1]}")
        if not np.isfinite(dense).all():
            from sterling.model.errors import NonFiniteError

            raise NonFiniteError(f"{items.path or 'item features'}: dense item features contain NaN or inf")
        keys = tuple(self.item_tower.keys)
        return ItemInputs(keys=keys, lengths=np.stack(lens) if lens else np.zeros((0, n), np.int32),
                          values=np.concatenate(vals).astype(np.int64) if vals else np.zeros(0, np.int64),
                          dense=np.ascontiguousarray(dense))

    @torch.no_grad()
    def embed_items(self, inputs: ItemInputs, *, step: int = 8192) -> torch.Tensor:
        """[n, D] item-tower embeddings of ``inputs`` (no grad), in chunks of ``step`` items."""
        from sterling.model.errors import InvalidInputError as _Bad

        if self.item_tower is None:
            raise ArtifactError("this model has no item tower to embed items with; retrain it with `sterling train`")
        if tuple(inputs.keys) != tuple(self.item_tower.keys):
            raise _Bad(f"item features have keys {list(inputs.keys)}; the item tower takes {self.item_tower.keys}")
        n = len(inputs)
        if inputs.lengths.shape != (len(inputs.keys), n) or (inputs.lengths < 0).any() \
                or int(inputs.lengths.sum()) != inputs.values.size:
            raise _Bad(f"item features have lengths of shape {inputs.lengths.shape} summing to "
                       f"{int(inputs.lengths.sum())} for {inputs.values.size} values; give [len(keys), n] "
                       "non-negative lengths that sum to the number of values")
        limits = {f.name: f.num_embeddings for f in self.item_tower.config.sparse}
        if inputs.dense.shape != (n, self.item_tower.config.dense_dim):
            raise _Bad(f"item features have dense shape {inputs.dense.shape}; the item tower takes "
                       f"[{n}, {self.item_tower.config.dense_dim}]")
        off = [np.concatenate([[0], np.cumsum(ln)]).astype(np.int64) for ln in inputs.lengths]
        starts = np.concatenate([[0], np.cumsum([o[-1] for o in off])]).astype(np.int64)
        vals = [inputs.values[starts[i] : starts[i + 1]] for i in range(len(off))]
        for key, v in zip(inputs.keys, vals):
            bad = v[(v < 0) | (v >= limits[key])]
            if bad.size:
                raise _Bad(f"item feature {key!r} row {int(bad[0])} is outside its table (0..{limits[key] - 1}); "
                           "map raw values with item_inputs() (unseen ones share the OOV rows)")
        dd = self.item_tower.config.dense_dim
        dense = torch.from_numpy(np.ascontiguousarray(inputs.dense, dtype=np.float32)) if dd else None
        E = []
        for s in range(0, n, step):
            e = min(s + step, n)
            kjt = make_kjt(self.item_tower.keys, [v[o[s] : o[e]] for v, o in zip(vals, off)],
                           [ln[s:e] for ln in inputs.lengths])
            E.append(self.item_tower(kjt, None if dense is None else dense[s:e]))
        return torch.cat(E) if E else torch.zeros(0, self.index.dim)

    @torch.no_grad()
    def with_catalog(self, items, *, index_config=None) -> LearnedRetrievalModel:
        """The same model over a new item catalog: re-embed it with the trained item tower.

        Args:
            items: a ``FeatureTable`` with the columns the item tower was
                trained on (``read_features(path, "item_id")``); values unseen
                in training use the hashed out-of-vocabulary rows.
            index_config: ``IndexConfig`` for the new index (default: the current one, nlist re-chosen).
        """
        from sterling.model.build import build_index
        from sterling.model.config import IndexConfig

        E = self.embed_items(self.item_inputs(items))
        cfg = index_config or IndexConfig.from_dict({**self.index.config.to_dict(), "nlist": None})
        ids = torch.from_numpy(np.array(items.ids, dtype=np.int64))
        index = build_index(E, ids=ids, attributes=items.attributes, config=cfg)
        cache = EmbeddingCache.build(ids, self.overarch.item_side(E), self.cache.dtype_name)
        return LearnedRetrievalModel(
            index=index, user_tower=self.user_tower, overarch=self.overarch, heads=self.heads, cache=cache,
            users=self.users, item_tower=self.item_tower, value_formula=self.value_model.default, k0=self.k0,
            extra_meta=self.extra_meta,
        )

    # ------------------------------------------------------------- artifact
    def save(self, path: str | Path) -> None:
        """One artifact: index, towers, vocabularies (meta), cache, OverArch, heads, users table, Value Model."""
        tensors, meta = self.artifact_parts()
        write_artifact(path, kind="learned_retrieval_model", meta=meta, tensors=tensors)

    def artifact_parts(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, metadata) of the artifact ``save`` writes (the tensors are the live ones, not copies)."""
        tensors = {f"index.{n}": t for n, t in self.index.tensors().items()}
        parts = {"user_tower": self.user_tower, "overarch": self.overarch, "heads": self.heads, "cache": self.cache}
        if self.item_tower is not None:
            parts["item_tower"] = self.item_tower
        if self.users is not None:
            parts["users"] = self.users
        for prefix, mod in parts.items():
            tensors.update({f"{prefix}.{n}": t for n, t in mod.state_dict().items()})
        meta = {
            "index": self.index.meta(),
            "user_tower": self.user_tower.config.to_dict(),
            "item_tower": None if self.item_tower is None else self.item_tower.config.to_dict(),
            "overarch": overarch_meta(self.overarch),
            "tasks": self.tasks,
            "value_formula": self.value_model.default,
            "k0": self.k0,
            "users_keys": None if self.users is None else self.users.keys,
            "extra": self.extra_meta,
        }
        return tensors, meta

    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> LearnedRetrievalModel:
        h, tensors = read_artifact(path, verify=verify)
        if h["kind"] != "learned_retrieval_model":
            raise ArtifactError(f"{path} holds a {h['kind']!r}, not a learned retrieval model (use RetrievalModel.load)")
        m = h["meta"]

        def part(prefix: str) -> dict[str, torch.Tensor]:
            p = prefix + "."
            return {n[len(p):]: t for n, t in tensors.items() if n.startswith(p)}

        index = ItemIndex.from_parts(m["index"], part("index"))
        user_tower = Tower(Tower.Config(**m["user_tower"]))
        user_tower.load_state_dict(part("user_tower"), assign=True)
        item_tower = None
        if m.get("item_tower"):
            item_tower = Tower(Tower.Config(**m["item_tower"]))
            item_tower.load_state_dict(part("item_tower"), assign=True)
        overarch = overarch_from_meta(m["overarch"])
        overarch.load_state_dict(part("overarch"), assign=True)
        heads = TaskHeads(overarch.hidden_dim, m["tasks"])
        heads.load_state_dict(part("heads"), assign=True)
        c = part("cache")
        data = overarch.adapt_cache(c["data"])  # a cache written by an earlier layout of this OverArch
        cache = EmbeddingCache(c["ids"], data, c["scale"], c.get("live"), c.get("delta_ids"), c.get("delta_rows"))
        users = None
        if m.get("users_keys") is not None:
            u = part("users")
            keys = m["users_keys"]
            inv = torch.empty_like(u["order"])
            inv[u["order"]] = torch.arange(len(inv))
            users = UserTable(u["ids"][inv], keys, {k: (u[f"v_{k}"], u[f"o_{k}"]) for k in keys}, u["dense"])
        return cls(
            index=index, user_tower=user_tower, overarch=overarch, heads=heads, cache=cache, users=users,
            item_tower=item_tower, value_formula=m["value_formula"], k0=m["k0"], extra_meta=m.get("extra"),
        )
