"""Exact k-way merge of per-shard top-k lists.

Each shard answers its top-k ordered by (score desc, slot asc), and shards
own increasing slot ranges. Concatenating the shard answers in shard order
and sorting by score with a *stable* sort therefore orders ties by global
slot, exactly like the single-process search; the first k are its answer.
"""

from __future__ import annotations

import numpy as np

__all__ = ["merge_topk"]


def merge_topk(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (ids [B, k_i], scores [B, k_i]) given in shard order → (ids [B, k], scores [B, k]).

    Missing results are id −1 with score −inf, as in ``ItemIndex.search``.
    """
    if not parts:
        raise ValueError("merge_topk needs at least one shard answer")
    if len(parts) == 1 and parts[0][0].shape[1] == k:  # one shard: already its (score, slot) order, padded
        ids, scores = parts[0]
        scores = np.where(ids < 0, np.float32(-np.inf), scores.astype(np.float32, copy=False))
        return np.where(np.isneginf(scores), -1, ids), scores
    ids = np.concatenate([p[0] for p in parts], axis=1)
    scores = np.concatenate([p[1] for p in parts], axis=1).astype(np.float32, copy=False)
    scores = np.where(ids < 0, np.float32(-np.inf), scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    top_ids = np.take_along_axis(ids, order, axis=1)
    top_s = np.take_along_axis(scores, order, axis=1)
    B, have = top_ids.shape
    if have < k:
        top_ids = np.concatenate([top_ids, np.full((B, k - have), -1, dtype=np.int64)], axis=1)
        top_s = np.concatenate([top_s, np.full((B, k - have), -np.inf, dtype=np.float32)], axis=1)
    top_ids = np.where(np.isneginf(top_s), -1, top_ids)
    return top_ids, top_s
