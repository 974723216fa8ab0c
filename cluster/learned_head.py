"""The router's half of a learned model: user tower in front of the shards, OverArch + heads + Value Model after.

Document shards hold slices of the learned model's item index and return
their top-K0 candidates; the router merges them exactly (as for any model)
and then reranks the merged K0 with ``LearnedRetrievalModel.rank`` — the
same code the single-process ``forward`` runs, so a served answer equals
the in-process one whenever the merged candidates do (they are bit-identical
with ``adaptive=False``).

The head keeps everything *but* the item index (an empty slice stands in for
it): towers, users table, OverArch, task heads and the item-embedding cache
the OverArch reads for the K0 candidates. ``guard``: a query holds its read
side from the fan-out to the rerank; streaming updates (``LiveShards``) apply
a request to the shards' index slices and to the cache under its write side.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from sterling.cluster.errors import RequestTooLargeError
from sterling.model.errors import DimensionMismatchError, InvalidInputError, LimitExceededError
from sterling.model.index import prepare_queries
from sterling.model.learned import LearnedRetrievalModel, nprobe_for_k0
from sterling.model.live import ReadWriteGuard
from sterling.sharding.documents import slice_index

__all__ = ["SparseInput", "LearnedHead"]


@dataclass(frozen=True, kw_only=True, slots=True)
class SparseInput:
    """User sparse features as a KeyedJaggedTensor's parts (key-major).

    ``lengths`` has ``len(keys) × B`` entries (all of key 0's rows, then key
    1's …); ``values`` holds ``sum(lengths)`` ids in the same order.
    """

    keys: tuple[str, ...]
    lengths: np.ndarray  # int32 [len(keys) * B]
    values: np.ndarray  # int64 [sum(lengths)]

    @property
    def batch(self) -> int:
        return len(self.lengths) // max(len(self.keys), 1)


class LearnedHead:
    """Wraps a ``LearnedRetrievalModel`` for a router (see the module docstring)."""

    def __init__(self, model) -> None:
        idx = model.index
        self.num_items, self.capacity, self.nlist = idx.num_items, idx.capacity, idx.nlist
        self.default_nprobe = idx.default_nprobe()
        self.dim, self.metric = idx.dim, idx.metric
        self.model = LearnedRetrievalModel(
            index=slice_index(idx, (0, 0)), user_tower=model.user_tower, overarch=model.overarch,
            heads=model.heads, cache=model.cache, users=model.users, item_tower=model.item_tower,
            value_formula=model.value_model.default, k0=model.k0, extra_meta=model.extra_meta,
        ).eval()
        self.guard = ReadWriteGuard()
        self.tasks = list(self.model.tasks)
        self.value_model = self.model.value_model
        tower = model.user_tower
        self.sparse_keys = tuple(tower.keys)
        self.num_embeddings = {s.name: s.num_embeddings for s in tower.config.sparse}
        self.dense_dim = tower.config.dense_dim

    # ------------------------------------------------------------ inputs
    def encode(self, *, query=None, dense=None, user_ids=None, sparse: SparseInput | None = None) -> torch.Tensor:
        """[B, D] user embeddings from exactly one of a query embedding, user ids, sparse (+ dense) features."""
        given = [n for n, v in (("query_embedding", query), ("user_ids", user_ids), ("sparse_features", sparse))
                 if v is not None]
        if len(given) != 1:
            raise InvalidInputError(
                f"give exactly one of query_embedding, user_ids or sparse_features (got {given or 'none'}); "
                "user_features are the dense part of sparse_features"
            )
        if dense is not None and sparse is None:
            raise InvalidInputError(
                "user_features are the dense part of sparse_features for a learned model; send them together "
                "(or send user_ids / query_embedding alone)"
            )
        if query is not None:
            q = torch.as_tensor(query, dtype=torch.float32)
            prepare_queries(q, self.dim, self.metric)  # typed errors: shape, NaN/inf, huge values
            return q[None] if q.ndim == 1 else q
        with torch.inference_mode():
            if user_ids is not None:
                ids = np.asarray(user_ids)
                if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
                    raise InvalidInputError(f"user_ids must be a non-empty list of integers, got {user_ids!r:.80}")
                if self.model.users is None:
                    raise InvalidInputError("this model ships no users table; send sparse_features instead")
                return self.model.user_embedding(user_ids=torch.from_numpy(ids.astype(np.int64))).clone()
            kjt, dense_t = self._kjt(sparse, dense)
            return self.model.user_embedding(kjt=kjt, dense=dense_t).clone()

    def _kjt(self, sp: SparseInput, dense):
        from sterling.model.towers import make_kjt

        keys = tuple(sp.keys)
        if keys != self.sparse_keys:
            raise InvalidInputError(f"sparse feature keys {list(keys)} must be the tower's, in order: "
                                    f"{list(self.sparse_keys)}")
        lengths = np.asarray(sp.lengths, dtype=np.int64)
        values = np.asarray(sp.values, dtype=np.int64)
        if len(keys) == 0 or lengths.size == 0 or lengths.size % len(keys):
            raise InvalidInputError(f"{lengths.size} lengths for {len(keys)} keys; give len(keys) × batch lengths")
        if (lengths < 0).any() or int(lengths.sum()) != values.size:
            raise InvalidInputError(f"lengths sum to {int(lengths.sum())} (negatives: {int((lengths < 0).sum())}) "
                                    f"but {values.size} values were sent; they must match")
        B = lengths.size // len(keys)
        per_key = lengths.reshape(len(keys), B)
        vals, lens, start = [], [], 0
        for key, ln in zip(keys, per_key):
            n = int(ln.sum())
            v = values[start : start + n]
            start += n
            limit = self.num_embeddings[key]
            bad = v[(v < 0) | (v >= limit)]
            if bad.size:
                raise LimitExceededError(
                    f"sparse feature {key!r} id {int(bad[0])} is outside its table (0..{limit - 1}); map unseen "
                    "values to an OOV bucket as the training data did", name=key, value=int(bad[0]), limit=limit)
            vals.append(v)
            lens.append(ln.astype(np.int32))
        dense_t = None
        if self.dense_dim:
            if dense is None:
                raise InvalidInputError(f"this tower also needs {self.dense_dim} dense user_features per user")
            dense_t = torch.as_tensor(np.asarray(dense, dtype=np.float32))
            dense_t = dense_t.reshape(1, -1) if dense_t.ndim == 1 else dense_t
            if dense_t.shape != (B, self.dense_dim):
                raise DimensionMismatchError(f"user_features have shape {tuple(dense_t.shape)}; the tower expects "
                                             f"[{B}, {self.dense_dim}]")
            if not bool(torch.isfinite(dense_t).all()):
                from sterling.model.errors import NonFiniteError

                raise NonFiniteError("user_features contain NaN or inf")
        elif dense is not None and np.asarray(dense).size:
            raise InvalidInputError("this tower takes no dense features; drop user_features")
        return make_kjt(list(keys), vals, lens), dense_t

    def k0_and_nprobe(self, k: int, k0: int | None, nprobe: int | None, batch: int, config) -> tuple[int, int]:
        """Candidates per query the shards return, and the lists they probe (as the model chooses them)."""
        if k0 is not None and (isinstance(k0, bool) or not isinstance(k0, (int, np.integer)) or k0 < 0):
            raise InvalidInputError(f"k0 ({k0!r}) must be an integer ≥ 0 (0 = the model's default)")
        k0 = self.model.k0_for(k, k0)
        if k0 > config.max_k0:
            raise LimitExceededError(
                f"k0 ({k0}) is above this server's max_k0 ({config.max_k0}); rerank fewer candidates or start "
                "the server with a larger --max-k0", name="k0", value=k0, limit=config.max_k0)
        k0 = int(min(k0, max(self.num_items, 1)))
        if batch * k0 > config.max_results:
            raise RequestTooLargeError(
                f"batch × k0 = {batch} × {k0} = {batch * k0} candidates is above this server's max_results "
                f"({config.max_results}); lower k0 or split the batch"
            )
        if not nprobe:
            nprobe = nprobe_for_k0(k0, capacity=self.capacity, nlist=self.nlist, default=self.default_nprobe)
        return k0, int(nprobe)

    # ------------------------------------------------------------ rerank
    def rank(self, u: torch.Tensor, ids: np.ndarray, scores: np.ndarray, k: int, value_formula: str | None):
        """Merged [B, K0] candidates → (ids [B, k], values [B, k], task scores [B, k, T]) as numpy."""
        with torch.inference_mode():
            out = self.model.rank(u, torch.from_numpy(np.ascontiguousarray(scores)),
                                  torch.from_numpy(np.ascontiguousarray(ids)), k, value_formula)
        return out.ids.numpy(), out.values.numpy(), out.task_scores.numpy()
