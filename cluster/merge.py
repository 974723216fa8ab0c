"""Exact k-way merge of per-shard top-k lists.

Each shard answers its top-k ordered by (score desc, slot asc), and shards
own increasing slot ranges. Concatenating the shard answers in shard order
and sorting by score with a *stable* sort therefore orders ties by global
slot, exactly like the single-process search; the first k are its answer.
"""

from __future__ import annotations

import numpy as np

__all__ = ["merge_topk", "merge_widened_ids"]


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


def merge_widened_ids(ids1: np.ndarray, s1: np.ndarray, ids2: np.ndarray, s2: np.ndarray,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
    """A widening round's answer (``ShardRequest.skip_lists``) merged into the first: ids/scores [b, k] each.

    The router's ``sterling.model.search.merge_widened``: the k best of both by
    score (stable, the first answer's items first at a tie); an id in both
    (a list the widening probe ranked differently from the first, at a
    near-tie of centroid scores) is kept once, at its higher score.
    """
    ids = np.concatenate([ids1, ids2], axis=1)
    scores = np.concatenate([s1, s2], axis=1).astype(np.float32, copy=False)
    scores = np.where(ids < 0, np.float32(-np.inf), scores)
    order = np.argsort(-scores, axis=1, kind="stable")
    ids, scores = np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
    by_id = np.argsort(ids, axis=1, kind="stable")  # equal ids: the higher score first
    sid = np.take_along_axis(ids, by_id, axis=1)
    dup = np.zeros_like(sid, dtype=bool)
    dup[:, 1:] = (sid[:, 1:] == sid[:, :-1]) & (sid[:, 1:] >= 0)
    if dup.any():
        drop = np.zeros_like(dup)
        np.put_along_axis(drop, by_id, dup, axis=1)
        scores = np.where(drop, np.float32(-np.inf), scores)
        order = np.argsort(-scores, axis=1, kind="stable")
        ids, scores = np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
    ids, scores = ids[:, :k], scores[:, :k]
    return np.where(np.isneginf(scores), -1, ids), scores
