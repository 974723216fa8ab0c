"""Training the learned model: two towers, then the index, then OverArch + heads on hard negatives.

1. Split each user's interactions by time: the last ``eval_fraction`` is
   held out (test); of the rest, the last ``rerank_fraction`` (set B) labels
   the OverArch and the earlier part (set A) trains the towers. User
   features (``history``) come from the past only: A for training, A ∪ B at
   evaluation — so neither stage learns from its own labels.
2. Two-tower softmax over in-batch + uniformly sampled negatives with logQ
   correction (subtract the log of each negative's expected count); the
   target is dropped from the user's history in every example.
3. ``build_index`` over the item tower's embeddings.
4. OverArch + heads: each user's top-``k0_train`` retrieved items (seen
   items dropped; B positives among them are the labels) with a listwise
   softmax loss per task; item-side projections are computed from the frozen item
   embeddings during training and cached at the end.

Deterministic for a fixed ``seed`` (torch, numpy and the index's k-means).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sterling.model.build import build_index
from sterling.model.config import IndexConfig
from sterling.model.data import FeatureTable, Interactions, Vocab, check_references, csr_take
from sterling.model.errors import InvalidInputError
from sterling.model.heads import TaskHeads
from sterling.model.learned import EmbeddingCache, LearnedRetrievalModel, UserTable
from sterling.model.overarch import build_overarch
from sterling.model.towers import SparseFeature, Tower, make_kjt

__all__ = ["TrainConfig", "Dataset", "train", "evaluate", "split_by_time"]


@dataclass(kw_only=True, slots=True)
class TrainConfig:
    """Everything ``sterling train`` can set (``--config train.yaml`` holds these keys).

    ``list_slack``: spare slots per IVF list of the trained index, as a fraction
    of the list's items (at least one per non-empty list), so streaming
    upserts (``LiveModel.upsert(ids, item_features=…)``) land in place instead
    of re-packing the whole index for the first new item; 0.125 by default,
    the item cache's own growth margin.
    """

    dim: int = 64
    emb_dim: int = 32
    hidden_dims: tuple[int, ...] = (128,)
    tower_epochs: int = 6
    batch_size: int = 512
    lr: float = 3e-3
    temperature: float = 0.1
    sampled_negatives: int = 256
    logq_correction: bool = True
    history_max: int = 50
    overarch: str = "mol"
    overarch_options: dict = field(default_factory=dict)
    overarch_epochs: int = 15
    overarch_lr: float = 3e-3
    patience: int = 4
    k0_train: int = 400
    user_batch: int = 128
    k0: int = 1000
    cache_dtype: str = "fp32"
    nlist: int | None = None
    list_slack: float = 0.125
    eval_fraction: float = 0.1
    rerank_fraction: float = 0.2
    oov_buckets: int = 8
    max_vocab: int = 1_000_000
    value_formula: str | None = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(self.hidden_dims)
        for name in ("dim", "emb_dim", "tower_epochs", "batch_size", "history_max", "k0_train", "user_batch", "k0"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} ({getattr(self, name)}) must be ≥ 1")
        if self.overarch_epochs < 0 or self.sampled_negatives < 0:
            raise InvalidInputError("overarch_epochs and sampled_negatives must be ≥ 0")
        if not 0.0 <= self.eval_fraction < 1.0 or not 0.0 < self.rerank_fraction < 1.0:
            raise InvalidInputError(
                f"eval_fraction ({self.eval_fraction}) must be in [0, 1), rerank_fraction ({self.rerank_fraction}) in (0, 1)"
            )
        if self.temperature <= 0:
            raise InvalidInputError(f"temperature ({self.temperature}) must be > 0")
        if not 0.0 <= self.list_slack <= 10.0:
            raise InvalidInputError(f"list_slack ({self.list_slack}) must be in [0, 10] (spare slots per list for "
                                    "upserts, as a fraction of its items; 0 = the first new item re-packs)")

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InvalidInputError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**d)


def split_by_time(users: np.ndarray, timestamp: np.ndarray | None, fraction: float) -> np.ndarray:
    """[N] bool: the last ``round(fraction · n)`` records of each user with ≥ 3 records (at least one)."""
    n = len(users)
    ts = np.zeros(n, np.int64) if timestamp is None else timestamp
    order = np.lexsort((np.arange(n), ts, users))  # by user, then time, then row
    u = users[order]
    starts = np.flatnonzero(np.r_[True, u[1:] != u[:-1]])
    counts = np.diff(np.r_[starts, n])
    take = np.where(counts >= 3, np.maximum(1, np.round(fraction * counts)).astype(np.int64), 0) if fraction else 0 * counts
    rank_from_end = np.arange(n) - np.repeat(starts, counts)
    rank_from_end = np.repeat(counts, counts) - 1 - rank_from_end
    out = np.zeros(n, bool)
    out[order] = rank_from_end < np.repeat(take, counts)
    return out


def _csr_from_pairs(rows: np.ndarray, values: np.ndarray, n_rows: int, order_key: np.ndarray, keep_last: int):
    """CSR of ``values`` grouped by ``rows`` (ordered by ``order_key``), keeping each row's last ``keep_last``."""
    o = np.lexsort((order_key, rows))
    r, v = rows[o], values[o]
    counts = np.bincount(r, minlength=n_rows)
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    pos = np.arange(len(r)) - np.repeat(starts, counts)
    keep = pos >= np.repeat(counts - keep_last, counts)
    r, v = r[keep], v[keep]
    offsets = np.zeros(n_rows + 1, np.int64)
    np.cumsum(np.bincount(r, minlength=n_rows), out=offsets[1:])
    return v.astype(np.int64), offsets


class Dataset:
    """Vocabularies and vocabulary-mapped CSR features for users and items, plus the splits."""

    def __init__(self, inter: Interactions, users: FeatureTable | None, items: FeatureTable | None, cfg: TrainConfig):
        check_references(inter, users=users, items=items)
        self.cfg, self.tasks = cfg, list(inter.tasks)
        # items: the catalog is the items table, else every item seen in the interactions
        if items is None:
            items = FeatureTable(ids=np.unique(inter.item_id))
        self.items = items
        self.item_ids = items.ids
        self.item_vocab = Vocab(items.ids.tolist(), 1)  # every catalog item has its own row
        self.item_sparse = {"item_id": (self.item_vocab.lookup(items.ids), np.arange(len(items) + 1, dtype=np.int64))}
        self.vocabs: dict[str, Vocab] = {"item.item_id": self.item_vocab}
        for name, (vals, offs) in items.sparse.items():
            voc = Vocab.build(vals, max_size=cfg.max_vocab, oov_buckets=cfg.oov_buckets)
            self.vocabs[f"item.{name}"] = voc
            self.item_sparse[name] = (voc.lookup(vals), offs)
        self.item_dense = np.concatenate(list(items.dense.values()), axis=1) if items.dense else None
        # users
        if users is None:
            users = FeatureTable(ids=np.unique(inter.user_id))
        self.users = users
        self.user_ids = users.ids
        self.inter = inter
        self.item_row = items.row_of(inter.item_id)
        self.user_row = users.row_of(inter.user_id)
        pos = np.zeros(len(inter), bool)
        for v in inter.tasks.values():
            pos |= v > 0
        self.positive = pos
        self.test = split_by_time(inter.user_id, inter.timestamp, cfg.eval_fraction)
        rest = ~self.test
        b_local = split_by_time(inter.user_id[rest], None if inter.timestamp is None else inter.timestamp[rest],
                                cfg.rerank_fraction)
        self.set_b = np.zeros(len(inter), bool)
        self.set_b[np.flatnonzero(rest)[b_local]] = True
        self.set_a = rest & ~self.set_b
        user_vocab_ids = np.unique(inter.user_id[self.set_a])
        self.vocabs["user.user_id"] = Vocab(user_vocab_ids.tolist(), cfg.oov_buckets)
        self.user_sparse_static = {"user_id": (self.vocabs["user.user_id"].lookup(users.ids),
                                               np.arange(len(users) + 1, dtype=np.int64))}
        for name, (vals, offs) in users.sparse.items():
            if name == "history":
                continue
            voc = Vocab.build(vals, max_size=cfg.max_vocab, oov_buckets=cfg.oov_buckets)
            self.vocabs[f"user.{name}"] = voc
            self.user_sparse_static[name] = (voc.lookup(vals), offs)
        self.user_dense = np.concatenate(list(users.dense.values()), axis=1) if users.dense else None
        self.user_keys = [*self.user_sparse_static, "history"]
        self.history_a = self._history(self.set_a)
        self.history_ab = self._history(self.set_a | self.set_b)

    def _history(self, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if "history" in self.users.sparse:
            vals, offs = self.users.sparse["history"]
            return self.item_vocab.lookup(vals), offs
        m = mask & self.positive
        ts = np.zeros(len(self.inter), np.int64) if self.inter.timestamp is None else self.inter.timestamp
        return _csr_from_pairs(self.user_row[m], self.item_row[m], len(self.users), ts[m], self.cfg.history_max)

    # ------------------------------------------------------------ configs
    def user_tower_config(self) -> Tower.Config:
        c = self.cfg
        sparse = [SparseFeature(name=k, num_embeddings=self.vocabs[f"user.{k}"].size, dim=c.emb_dim)
                  for k in self.user_sparse_static]
        sparse.append(SparseFeature(name="history", num_embeddings=self.item_vocab.size, dim=c.emb_dim))
        dd = 0 if self.user_dense is None else self.user_dense.shape[1]
        return Tower.Config(sparse=tuple(sparse), dense_dim=dd, hidden_dims=c.hidden_dims, output_dim=c.dim)

    def item_tower_config(self) -> Tower.Config:
        c = self.cfg
        sparse = [SparseFeature(name=k, num_embeddings=self.vocabs[f"item.{k}"].size, dim=c.emb_dim)
                  for k in self.item_sparse]
        dd = 0 if self.item_dense is None else self.item_dense.shape[1]
        return Tower.Config(sparse=tuple(sparse), dense_dim=dd, hidden_dims=c.hidden_dims, output_dim=c.dim)

    # ------------------------------------------------------------- inputs
    def user_inputs(self, rows: np.ndarray, history, drop_item_rows: np.ndarray | None = None):
        vals, lens = [], []
        for v, o in self.user_sparse_static.values():
            a, b = csr_take(v, o, rows)
            vals.append(a)
            lens.append(b)
        hv, hl = csr_take(history[0], history[1], rows)
        if drop_item_rows is not None and len(hv):
            keep = hv != np.repeat(drop_item_rows, hl)
            hl = np.bincount(np.repeat(np.arange(len(rows)), hl)[keep], minlength=len(rows))
            hv = hv[keep]
        vals.append(hv)
        lens.append(hl)
        dense = None if self.user_dense is None else torch.from_numpy(self.user_dense[np.maximum(rows, 0)])
        return make_kjt(self.user_keys, vals, lens), dense

    def item_inputs(self, rows: np.ndarray):
        vals, lens = [], []
        for _, (v, o) in self.item_sparse.items():
            a, b = csr_take(v, o, rows)
            vals.append(a)
            lens.append(b)
        dense = None if self.item_dense is None else torch.from_numpy(self.item_dense[rows])
        return make_kjt(list(self.item_sparse), vals, lens), dense

    def users_table(self) -> UserTable:
        """Users with full-train history (A ∪ B), for serving and evaluation by user id."""
        sparse = {k: (torch.from_numpy(v), torch.from_numpy(o)) for k, (v, o) in self.user_sparse_static.items()}
        sparse["history"] = tuple(torch.from_numpy(x) for x in self.history_ab)
        dense = None if self.user_dense is None else torch.from_numpy(self.user_dense)
        return UserTable(torch.from_numpy(self.user_ids.copy()), self.user_keys, sparse, dense)


def _seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def item_embeddings(tower: Tower, data: Dataset, batch: int = 8192) -> torch.Tensor:
    out = []
    for s in range(0, len(data.item_ids), batch):
        kjt, dense = data.item_inputs(np.arange(s, min(s + batch, len(data.item_ids))))
        out.append(tower(kjt, dense))
    return torch.cat(out)


def train_towers(data: Dataset, cfg: TrainConfig, log: dict) -> tuple[Tower, Tower]:
    _seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    user_tower, item_tower = Tower(data.user_tower_config()), Tower(data.item_tower_config())
    opt = torch.optim.Adam([*user_tower.parameters(), *item_tower.parameters()], lr=cfg.lr)
    ex = np.flatnonzero(data.set_a & data.positive)
    if len(ex) == 0:
        raise InvalidInputError("no positive training interactions after the split; lower eval_fraction or add data")
    n_items = len(data.item_ids)
    freq = np.bincount(data.item_row[ex], minlength=n_items) / len(ex)
    log_q = torch.from_numpy(np.log(np.maximum(freq, 1e-12))).float()
    losses = []
    bar = tqdm(range(cfg.tower_epochs), desc="two-tower", disable=not cfg.progress)
    for _ in bar:
        perm = ex[rng.permutation(len(ex))]
        tot = 0.0
        for s in range(0, len(perm), cfg.batch_size):
            b = perm[s : s + cfg.batch_size]
            ur, ir = data.user_row[b], data.item_row[b]
            u = user_tower(*data.user_inputs(ur, data.history_a, drop_item_rows=ir))
            neg = rng.integers(0, n_items, cfg.sampled_negatives)
            cand = np.concatenate([ir, neg])
            v = item_tower(*data.item_inputs(cand))
            logits = u @ v.T / cfg.temperature  # [B, B + S]
            ir_t, cand_t = torch.from_numpy(ir), torch.from_numpy(cand)
            expected = torch.cat([log_q[ir_t] + math.log(len(b)), torch.full((len(neg),), math.log(len(neg) / n_items))])
            if cfg.logq_correction:
                logits = logits - expected
            same = ir_t[:, None] == cand_t[None, :]
            same[torch.arange(len(b)), torch.arange(len(b))] = False
            logits = logits.masked_fill(same, float("-inf"))
            loss = F.cross_entropy(logits, torch.arange(len(b)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach()) * len(b)
        losses.append(tot / len(perm))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    log["tower_loss"] = [round(x, 4) for x in losses]
    return user_tower, item_tower


def _drop_seen(cand_rows: np.ndarray, seen: tuple[np.ndarray, np.ndarray], user_rows: np.ndarray) -> np.ndarray:
    """[B, K] bool: candidate (an item row) is in that user's seen CSR."""
    sv, sl = csr_take(seen[0], seen[1], user_rows)
    B, K = cand_rows.shape
    n = int(cand_rows.max(initial=0)) + 2
    keys = np.repeat(np.arange(B), sl) * n + sv
    flat = (np.arange(B)[:, None] * n + cand_rows).reshape(-1)
    return np.isin(flat, keys).reshape(B, K)


def _retrieve(model: LearnedRetrievalModel, u: torch.Tensor, k: int, seen, user_rows, id_to_row) -> tuple:
    """Top-k (scores, item rows) per user with seen items removed; −1 rows pad."""
    max_seen = int(np.diff(seen[1])[user_rows].max(initial=0)) if len(user_rows) else 0
    kk = min(model.index.num_items, k + max_seen)
    scores, ids = model.candidates(u, kk)
    rows = id_to_row(ids.numpy())
    bad = (rows < 0) | _drop_seen(np.maximum(rows, 0), seen, user_rows)
    sc = scores.numpy().copy()
    sc[bad] = -np.inf
    order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
    rows = np.take_along_axis(rows, order, 1)
    sc = np.take_along_axis(sc, order, 1)
    rows[np.isneginf(sc)] = -1
    return sc, rows


def train_overarch(model: LearnedRetrievalModel, data: Dataset, E: torch.Tensor, cfg: TrainConfig, log: dict) -> None:
    _seed(cfg.seed + 1)
    rng = np.random.default_rng(cfg.seed + 1)
    id_to_row = _id_to_row(data)
    b_rows = np.flatnonzero(data.set_b)
    users = np.unique(data.user_row[b_rows])
    if len(users) == 0 or cfg.overarch_epochs == 0:
        log["overarch_loss"] = []
        return
    seen_a = _csr_from_pairs(data.user_row[data.set_a], data.item_row[data.set_a], len(data.users),
                             np.zeros(int(data.set_a.sum()), np.int64), 1 << 30)
    T = len(data.tasks)
    K = min(cfg.k0_train, len(data.item_ids))
    cands, us = [], []
    with torch.no_grad():
        for s in range(0, len(users), 512):
            ur = users[s : s + 512]
            u = model.user_tower(*data.user_inputs(ur, data.history_a))
            _, rows = _retrieve(model, u, K, seen_a, ur, id_to_row)
            us.append(u)
            cands.append(rows)

    U = torch.cat(us)
    cand = np.concatenate(cands)
    # labels and inserted positives
    lab = np.zeros((len(users), K, T), np.float32)
    pos_of_user = {}
    uix = {int(r): i for i, r in enumerate(users)}
    task_mat = np.stack([data.inter.tasks[t] for t in data.tasks], axis=1)
    for r in b_rows[data.positive[b_rows]]:
        pos_of_user.setdefault(uix[int(data.user_row[r])], []).append((int(data.item_row[r]), task_mat[r] > 0))
    for i, plist in pos_of_user.items():  # positives the index did not retrieve are not inserted: a
        row = cand[i]                      # reranker trained on them learns "low index score ⇒ positive"
        for item, tv in plist:
            hit = np.flatnonzero(row == item)
            if len(hit):
                lab[i, hit[0]] = np.maximum(lab[i, hit[0]], tv.astype(np.float32))
    cand_t = torch.from_numpy(cand)
    valid = cand_t >= 0
    lab_t = torch.from_numpy(lab)
    params = [*model.overarch.parameters(), *model.heads.parameters()]
    opt = torch.optim.Adam(params, lr=cfg.overarch_lr)

    def batch_loss(b: torch.Tensor) -> torch.Tensor | None:
        c, vmask, y = cand_t[b], valid[b], lab_t[b]
        u = U[b]
        v = E[c.clamp(min=0)]  # [B, K, D]
        prior = torch.bmm(v, u.unsqueeze(2)).squeeze(2).masked_fill(~vmask, 0.0)  # the index's score, unquantized
        x = model.overarch.item_side(v.reshape(-1, v.shape[2])).view(*c.shape, -1)
        logits = model.heads(model.overarch(u, x, vmask), prior).masked_fill(~vmask.unsqueeze(2), float("-inf"))
        logp = torch.log_softmax(logits, dim=1).masked_fill(~vmask.unsqueeze(2), 0.0)  # over candidates
        npos = y.sum(1)  # [B, T]
        has = npos > 0
        return -((logp * y).sum(1)[has] / npos[has]).mean() if bool(has.any()) else None

    # a tenth of the users validates each epoch; the best epoch is kept (epoch 0 = ranking by the index)
    perm0 = rng.permutation(len(users))
    n_val = len(users) // 10 if len(users) >= 20 else 0
    val, fit = torch.from_numpy(perm0[:n_val]), perm0[n_val:]

    def val_loss() -> float:
        if n_val == 0:
            return 0.0
        with torch.no_grad():
            tot = [batch_loss(val[s : s + 512]) for s in range(0, n_val, 512)]
        tot = [float(t) for t in tot if t is not None]
        return sum(tot) / max(len(tot), 1)

    def snapshot() -> dict[str, torch.Tensor]:
        return {**{f"o.{n}": t.clone() for n, t in model.overarch.state_dict().items()},
                **{f"h.{n}": t.clone() for n, t in model.heads.state_dict().items()}}

    best, best_epoch = val_loss(), 0
    best_state = snapshot()
    losses, vals = [], [round(best, 4)]
    bar = tqdm(range(cfg.overarch_epochs), desc=f"overarch ({model.overarch.kind})", disable=not cfg.progress)
    for epoch in bar:
        perm = fit[rng.permutation(len(fit))]
        tot, cnt = 0.0, 0
        for s in range(0, len(perm), cfg.user_batch):
            loss = batch_loss(torch.from_numpy(perm[s : s + cfg.user_batch]))
            if loss is None:
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += float(loss.detach())
            cnt += 1
        losses.append(tot / max(cnt, 1))
        vals.append(round(val_loss(), 4))
        if n_val == 0 or vals[-1] < best:
            best, best_epoch = vals[-1], epoch + 1
            best_state = snapshot()
        elif epoch + 1 - best_epoch >= cfg.patience:
            break
        bar.set_postfix(loss=f"{losses[-1]:.3f}", val=f"{vals[-1]:.3f}")
    model.overarch.load_state_dict({n[2:]: t for n, t in best_state.items() if n.startswith("o.")})
    model.heads.load_state_dict({n[2:]: t for n, t in best_state.items() if n.startswith("h.")})
    log["overarch_val_loss"] = vals
    log["overarch_best_epoch"] = best_epoch
    log["overarch_loss"] = [round(x, 4) for x in losses]


def _id_to_row(data: Dataset):
    order = np.argsort(data.item_ids)
    sorted_ids = data.item_ids[order]

    def f(ids: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(sorted_ids, ids), 0, len(sorted_ids) - 1)
        return np.where((sorted_ids[pos] == ids) & (ids >= 0), order[pos], -1)

    return f


def train(inter: Interactions, users: FeatureTable | None, items: FeatureTable | None, cfg: TrainConfig,
          *, evaluate_k: int = 100) -> tuple[LearnedRetrievalModel, Dataset, dict]:
    """Train everything and return (model, dataset, metrics); ``metrics["eval"]`` is on the held-out split."""
    t0 = time.perf_counter()
    log: dict = {"config": asdict(cfg)}
    data = Dataset(inter, users, items, cfg)
    user_tower, item_tower = train_towers(data, cfg, log)
    log["tower_s"] = round(time.perf_counter() - t0, 1)
    E = item_embeddings(item_tower, data)
    attrs = data.items.attributes
    index = build_index(E, ids=torch.from_numpy(data.item_ids.copy()), attributes=attrs,
                        config=IndexConfig(nlist=cfg.nlist, seed=cfg.seed, list_slack=cfg.list_slack))
    _seed(cfg.seed + 2)
    overarch = build_overarch(cfg.overarch, cfg.dim, **cfg.overarch_options)
    heads = TaskHeads(overarch.hidden_dim, data.tasks, prior_scale=1.0 / cfg.temperature)
    ids_t = torch.from_numpy(data.item_ids.copy())
    with torch.no_grad():
        cache = EmbeddingCache.build(ids_t, overarch.item_side(E), cfg.cache_dtype)
    model = LearnedRetrievalModel(
        index=index, user_tower=user_tower, item_tower=item_tower, overarch=overarch, heads=heads, cache=cache,
        users=data.users_table(), value_formula=cfg.value_formula, k0=cfg.k0,
        extra_meta={"vocabs": {k: v.to_meta() for k, v in data.vocabs.items()}},
    )
    t1 = time.perf_counter()
    train_overarch(model, data, E, cfg, log)
    with torch.no_grad():
        model.cache = EmbeddingCache.build(ids_t, overarch.item_side(E), cfg.cache_dtype)
    log["overarch_s"] = round(time.perf_counter() - t1, 1)
    model.eval()
    if cfg.eval_fraction > 0:
        log["eval"] = evaluate(model, data, k=evaluate_k, k0=cfg.k0)[0]
    log["train_s"] = round(time.perf_counter() - t0, 1)
    return model, data, log


# ------------------------------------------------------------------ evaluation
def ranking_metrics(recs: dict[int, list[int]], truth: dict[int, set[int]], k: int) -> dict[str, float]:
    """Mean recall@k and NDCG@k over users with ≥ 1 relevant item (binary relevance)."""
    rec, ndcg, n = 0.0, 0.0, 0
    for user, rel in truth.items():
        if not rel:
            continue
        top = recs.get(user, [])[:k]
        hits = [1.0 if i in rel else 0.0 for i in top]
        rec += sum(hits) / len(rel)
        dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
        idcg = sum(1.0 / math.log2(r + 2) for r in range(min(len(rel), k)))
        ndcg += dcg / idcg
        n += 1
    return {f"recall@{k}": rec / max(n, 1), f"ndcg@{k}": ndcg / max(n, 1), "users": n}


def truth_sets(data: Dataset, mask: np.ndarray) -> dict[str, dict[int, set[int]]]:
    """Held-out relevant item ids per task and for ``all`` (any task > 0), keyed by user id."""
    out: dict[str, dict[int, set[int]]] = {}
    rows = np.flatnonzero(mask)
    for t in [*data.tasks, "all"]:
        lab = data.positive if t == "all" else data.inter.tasks[t] > 0
        d: dict[int, set[int]] = {}
        for r in rows[lab[rows]]:
            d.setdefault(int(data.inter.user_id[r]), set()).add(int(data.inter.item_id[r]))
        out[t] = d
    return out


def _mask_seen(ids: np.ndarray, users: np.ndarray, seen: dict[int, set[int]]) -> np.ndarray:
    """[B, K] bool: id ∈ that user's seen set."""
    out = np.zeros(ids.shape, bool)
    for i, u in enumerate(users.tolist()):
        s = seen.get(u)
        if s:
            out[i] = np.isin(ids[i], np.fromiter(s, np.int64, len(s)))
    return out


@torch.no_grad()
def recommend(model: LearnedRetrievalModel, user_ids: np.ndarray, *, k: int, k0: int,
              seen: dict[int, set[int]] | None = None, formulas: tuple[str | None, ...] = (None,), batch: int = 256):
    """Both stages for users of the artifact's users table, seen items dropped.

    Returns ``{"ann": (ids [U, k], scores), "full": (ids, values), "full:<formula>": …}``:
    ``ann`` ranks by the index score alone; ``full`` reranks K0 candidates with
    OverArch + heads + the model's Value Model formula, ``full:<f>`` with formula ``f``.
    """
    seen = seen or {}
    n_items = model.index.num_items
    stages = ["ann", *("full" if f is None else f"full:{f}" for f in formulas)]
    out: dict[str, tuple[list, list]] = {st: ([], []) for st in stages}

    def put(stage, sc, ids):
        tv, ti = sc.topk(min(k, sc.shape[1]), dim=1)
        out[stage][0].append(torch.gather(ids, 1, ti).masked_fill(torch.isneginf(tv), -1).numpy())
        out[stage][1].append(tv.numpy())

    for s in range(0, len(user_ids), batch):
        users = np.asarray(user_ids[s : s + batch], dtype=np.int64)
        u = model.user_embedding(user_ids=torch.from_numpy(users))
        extra = max((len(seen.get(int(x), ())) for x in users), default=0)
        sc, ids = model.candidates(u, min(n_items, k + extra))
        drop = torch.from_numpy(_mask_seen(ids.numpy(), users, seen)) | (ids < 0)
        put("ann", sc.masked_fill(drop, float("-inf")), ids)
        sc, ids = model.candidates(u, min(n_items, max(k0, k) + extra))
        drop = torch.from_numpy(_mask_seen(ids.numpy(), users, seen)) | (ids < 0)
        logits, valid = model.rerank_logits(u, ids, sc.masked_fill(drop, 0.0))
        probs = torch.sigmoid(logits)
        for f, stage in zip(formulas, stages[1:]):
            put(stage, model.value_model(probs, f).masked_fill(~valid | drop, float("-inf")), ids)
    return {st: (np.concatenate(a), np.concatenate(b)) for st, (a, b) in out.items()}


def seen_sets(user_id: np.ndarray, item_id: np.ndarray) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for u, i in zip(user_id.tolist(), item_id.tolist()):
        out.setdefault(u, set()).add(i)
    return out


def evaluate_interactions(model: LearnedRetrievalModel, test: Interactions, *, k: int = 100, k0: int = 1000,
                          exclude: Interactions | None = None, formula: str | None = None):
    """(metrics {stage: {task: {recall@k, ndcg@k, users}}}, (users, recs)) on a test interactions set."""
    truth: dict[str, dict[int, set[int]]] = {}
    pos = np.zeros(len(test), bool)
    for t, v in test.tasks.items():
        truth[t] = seen_sets(test.user_id[v > 0], test.item_id[v > 0])
        pos |= v > 0
    truth["all"] = seen_sets(test.user_id[pos], test.item_id[pos])
    users = np.array(sorted(truth["all"]), dtype=np.int64)
    seen = seen_sets(exclude.user_id, exclude.item_id) if exclude is not None else None
    tasks = [t for t in test.tasks if t in model.tasks]
    recs = recommend(model, users, k=k, k0=k0, seen=seen, formulas=(formula, *tasks))
    metrics = {}
    for stage in ("ann", "full"):
        metrics[stage] = {}
        for t in truth:
            # per task, the full stage ranks by that task's head; "all" by the Value Model formula
            ids = recs[f"full:{t}" if stage == "full" and t in tasks else stage][0]
            lists = {int(u): [int(i) for i in row if i >= 0] for u, row in zip(users, ids)}
            metrics[stage][t] = ranking_metrics(lists, truth[t], k)
    recs = {st: recs[st] for st in ("ann", "full")}
    return metrics, (users, recs)


def evaluate(model: LearnedRetrievalModel, data: Dataset, *, k: int = 100, k0: int = 1000,
             exclude: bool = True, formula: str | None = None):
    """Metrics and recs on the dataset's held-out split, excluding each user's training interactions."""
    return evaluate_interactions(model, data.inter.take(np.flatnonzero(data.test)), k=k, k0=k0,
                                 exclude=data.inter.take(np.flatnonzero(~data.test)) if exclude else None,
                                 formula=formula)
