"""A deterministic synthetic recommendation data set with hidden factors.

Users have two hidden interests (so one dot product cannot represent them);
items have a topic, a latent vector around the topic and a popularity bias.
Engagement is sampled from ``exp(α · max(u₁·v, u₂·v) + b_item)`` without
replacement; ``like`` follows the *first* interest only and ``share`` a
fraction of likes, so the tasks disagree in a learnable way. Users carry a
``region`` (coarse first interest) and an ``age``; items a ``topic``, a dense
``quality`` and filter ``attributes`` (``topic:…``, ``lang:…``). Written in
the Parquet layout of docs/data.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sterling.model.data import write_parquet

__all__ = ["SyntheticRecData", "synthetic_rec_data", "write_synthetic_rec"]


@dataclass(slots=True)
class SyntheticRecData:
    interactions: dict
    users: dict
    items: dict


def synthetic_rec_data(
    n_users: int = 2000,
    n_items: int = 4000,
    *,
    n_topics: int = 24,
    factors: int = 16,
    per_user: tuple[int, int] = (20, 60),
    alpha: float = 6.0,
    seed: int = 0,
) -> SyntheticRecData:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_topics, factors))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    topic = rng.integers(0, n_topics, n_items)
    v = centers[topic] + 0.45 * rng.standard_normal((n_items, factors)) / factors**0.5
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    bias = 0.8 * rng.standard_normal(n_items)
    t1 = rng.integers(0, n_topics, n_users)
    t2 = rng.integers(0, n_topics, n_users)
    u1 = centers[t1] + 0.35 * rng.standard_normal((n_users, factors)) / factors**0.5
    u2 = centers[t2] + 0.35 * rng.standard_normal((n_users, factors)) / factors**0.5
    s1, s2 = u1 @ v.T, u2 @ v.T  # [U, I]
    logits = alpha * np.maximum(s1, s2) + bias[None]
    gumbel = -np.log(-np.log(rng.random(logits.shape)))
    counts = rng.integers(per_user[0], per_user[1] + 1, n_users)
    order = np.argsort(-(logits + gumbel), axis=1)
    uid, iid = [], []
    for u in range(n_users):
        chosen = order[u, : counts[u]]
        uid.append(np.full(len(chosen), u))
        iid.append(chosen)
    uid, iid = np.concatenate(uid), np.concatenate(iid)
    p_like = 1 / (1 + np.exp(-(8.0 * s1[uid, iid] - 4.0)))
    like = (rng.random(len(uid)) < p_like).astype(np.float32)
    share = (like * (rng.random(len(uid)) < 0.3)).astype(np.float32)
    ts = rng.integers(1_600_000_000, 1_700_000_000, len(uid))
    langs = np.array(["en", "es", "pt", "fr", "de"])
    lang = langs[rng.choice(len(langs), n_items, p=[0.5, 0.2, 0.15, 0.1, 0.05])]
    user_ids = np.arange(n_users, dtype=np.int64) + 1
    item_ids = np.arange(n_items, dtype=np.int64) + 100_000
    return SyntheticRecData(
        interactions={
            "user_id": user_ids[uid],
            "item_id": item_ids[iid],
            "timestamp": ts.astype(np.int64),
            "click": np.ones(len(uid), np.float32),
            "like": like,
            "share": share,
        },
        users={
            "user_id": user_ids,
            "region": np.array([f"r{t // 3}" for t in t1], dtype=object),
            "age": rng.integers(18, 70, n_users).astype(np.int64),
        },
        items={
            "item_id": item_ids,
            "topic": topic.astype(np.int64),
            "quality": (bias + 0.3 * rng.standard_normal(n_items)).astype(np.float32),
            "attributes": [[f"topic:t{t}", f"lang:{lg}"] for t, lg in zip(topic.tolist(), lang.tolist())],
        },
    )


def write_synthetic_rec(out_dir: str | Path, **kwargs) -> dict[str, Path]:
    """Write interactions/users/items Parquet files into ``out_dir``; returns their paths."""
    data = synthetic_rec_data(**kwargs)
    out = Path(out_dir)
    paths = {n: out / f"{n}.parquet" for n in ("interactions", "users", "items")}
    write_parquet(paths["interactions"], data.interactions)
    write_parquet(paths["users"], data.users)
    write_parquet(paths["items"], data.items)
    return paths
