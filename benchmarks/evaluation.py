"""One evaluation toolkit (as Faiss keeps ``contrib/evaluation.py``) for the demo, benchmarks and tests.

- ``exact_topk``: fp32 brute force, optionally under an eligibility mask;
- ``recall``: |found ∩ truth| / |truth| over rows, pads (−1) ignored;
- ``assert_same_topk``: a tie-aware comparison of two top-k answers;
- ``best_time`` / ``blocked`` / ``percentiles_ms``: timers (warm-up, best of
  several runs) and latency percentiles;
- ``holds``: a plain-Python evaluator of a parsed filter expression over one
  item's terms; ``RoaringIndex`` and ``ForwardIndex``: the inverted-index
  (pyroaring) and NumPy forward-index peers a filter benchmark compares with;
- ``machine`` / ``commit``: what a benchmark record names.

Nothing here calls Sterling's search: these are the oracles and peers it is
measured against.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from pathlib import Path

import numpy as np

__all__ = [
    "exact_topk", "recall", "assert_same_topk", "best_time", "blocked", "percentiles_ms", "holds",
    "RoaringIndex", "ForwardIndex", "machine", "commit", "start_listening",
]


# ------------------------------------------------------------------ exact search
def exact_topk(xq, xb, k: int, mask=None, *, chunk: int = 64):
    """fp32 brute force: (scores [B, k], rows [B, k]) with −inf / −1 where fewer than k exist.

    ``xq`` [B, D] and ``xb`` [N, D] torch tensors (inner product); ``mask``
    [N] or [B, N] bool keeps only eligible rows. Queries go ``chunk`` at a
    time so memory stays at chunk × N scores.
    """
    import torch

    k = min(k, xb.shape[0])
    out_s, out_i = [], []
    for s in range(0, xq.shape[0], chunk):
        sc = xq[s : s + chunk] @ xb.T
        if mask is not None:
            m = mask if mask.ndim == 1 else mask[s : s + chunk]
            sc = sc.masked_fill(~m, float("-inf"))
        top_s, top_i = sc.topk(k, dim=1)
        out_s.append(top_s)
        out_i.append(torch.where(torch.isneginf(top_s), torch.full_like(top_i, -1), top_i))
    return torch.cat(out_s), torch.cat(out_i)


def recall(found, truth) -> float:
    """Fraction of the true ids (≥ 0) that ``found`` holds, over all rows ([B, k] arrays or tensors)."""
    hit = total = 0
    for f, t in zip(np.asarray(found).tolist(), np.asarray(truth).tolist()):
        t = {x for x in t if x >= 0}
        hit += len(t & {x for x in f if x >= 0})
        total += len(t)
    return hit / max(total, 1)


def assert_same_topk(ids, scores, ref_ids, ref_scores, *, atol: float = 1e-6, exact: bool = False) -> None:
    """Two top-k answers are the same, allowing swaps only among near-equal scores.

    ``exact=True``: bit-identical ids and scores. Otherwise: padding
    identical, scores equal within ``atol``, and an id may differ from the
    reference only where the reference has a near-equal score at that rank
    (a tie the two computations may order differently) or at the boundary.
    """
    ids, scores = np.asarray(ids), np.asarray(scores)
    ref_ids, ref_scores = np.asarray(ref_ids), np.asarray(ref_scores)
    assert ids.shape == ref_ids.shape, (ids.shape, ref_ids.shape)
    if exact:
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(scores, ref_scores)
        return
    np.testing.assert_array_equal(ids < 0, ref_ids < 0, err_msg="different numbers of results")
    valid = ref_ids >= 0
    np.testing.assert_allclose(scores[valid], ref_scores[valid], rtol=0, atol=atol)
    assert np.isneginf(scores[~valid]).all()
    for q in np.nonzero((ids != ref_ids).any(1))[0]:
        n = int(valid[q].sum())
        row, ref_row = ids[q, :n], ref_ids[q, :n]
        assert len(set(row.tolist())) == n, f"query {q}: duplicate ids"
        for j in np.nonzero(row != ref_row)[0]:
            same = np.abs(ref_scores[q, :n] - ref_scores[q, j]) <= atol
            near = set(ref_row[same].tolist())
            boundary = abs(float(ref_scores[q, j]) - float(ref_scores[q, n - 1])) <= atol
            assert row[j] in near or boundary, (
                f"query {q} rank {j}: id {row[j]} (score {scores[q, j]}) vs {ref_row[j]} ({ref_scores[q, j]})"
            )


# ------------------------------------------------------------------ timers
def best_time(fn, repeat: int = 3, *, warmup: bool = True):
    """(best seconds over ``repeat`` runs, the last result); one untimed warm-up run first."""
    if warmup:
        fn()
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def blocked(fns: dict, repeat: int) -> dict:
    """``best_time`` of each function, one function after the other, each warmed up right
    before its own runs: a run never pays for the previous system's worker threads still
    spinning (OpenMP) on a small machine."""
    return {name: best_time(fn, repeat) for name, fn in fns.items()}


def percentiles_ms(lat_s, qs=(50, 99)) -> tuple[float, ...]:
    """Latency percentiles in milliseconds of a list of seconds."""
    a = np.asarray(lat_s, dtype=np.float64) * 1e3
    if a.size == 0:
        return tuple(float("nan") for _ in qs)
    return tuple(float(np.percentile(a, q)) for q in qs)


# ------------------------------------------------------------------ filters
def holds(node, terms: set[str]) -> bool:
    """Does an item with these ``feature:value`` terms satisfy a parsed expression
    (``sterling.model.filter.parse_filter``)? Plain Python, one item at a time."""
    from sterling.model.filter import And, Not, Or, Term

    if isinstance(node, Term):
        return node.text in terms
    if isinstance(node, Not):
        return not holds(node.child, terms)
    if isinstance(node, And):
        return all(holds(c, terms) for c in node.children)
    if isinstance(node, Or):
        return any(holds(c, terms) for c in node.children)
    raise TypeError(f"not a filter node: {node!r}")


class RoaringIndex:
    """The inverted-index peer: one ``pyroaring.BitMap`` per ``feature:value`` over item positions 0..N-1."""

    def __init__(self, attr_ids, attr_offsets, vocab: list[str], n: int) -> None:
        from pyroaring import BitMap

        lengths = np.diff(np.asarray(attr_offsets))
        item = np.repeat(np.arange(n, dtype=np.uint32), lengths)
        ids = np.asarray(attr_ids)
        order = np.argsort(ids, kind="stable")
        ids_sorted, items_sorted = ids[order], item[order]
        bounds = np.searchsorted(ids_sorted, np.arange(len(vocab) + 1))
        self.maps = {}
        for t, term in enumerate(vocab):
            bm = BitMap(items_sorted[bounds[t] : bounds[t + 1]])
            bm.run_optimize()
            self.maps[term] = bm
        self.universe = BitMap(np.arange(n, dtype=np.uint32))
        self.universe.run_optimize()
        self.empty = BitMap()

    def nbytes(self) -> int:
        return sum(bm.get_statistics()["n_bytes_array_containers"] + bm.get_statistics()["n_bytes_bitmap_containers"]
                   + bm.get_statistics()["n_bytes_run_containers"] for bm in self.maps.values())

    def serialized_bytes(self) -> int:
        return sum(len(bm.serialize()) for bm in self.maps.values())

    def eval(self, node):
        """The eligible positions of a parsed expression, as a BitMap (ANDs smallest first)."""
        from sterling.model.filter import And, Not, Or, Term

        if isinstance(node, Term):
            return self.maps.get(node.text, self.empty)
        if isinstance(node, Not):
            return self.universe - self.eval(node.child)
        parts = [self.eval(c) for c in node.children]
        if isinstance(node, And):
            parts.sort(key=len)  # smallest first, as any inverted index would
            acc = parts[0]
            for p in parts[1:]:
                acc = acc & p
            return acc
        assert isinstance(node, Or)
        acc = parts[0]
        for p in parts[1:]:
            acc = acc | p
        return acc


class ForwardIndex:
    """The NumPy forward-index peer: padded [N, L] int32 attribute ids (−1 pads); a term is ``(F == v).any(1)``."""

    def __init__(self, attr_ids, attr_offsets, vocab: list[str]) -> None:
        offsets = np.asarray(attr_offsets)
        lengths = np.diff(offsets)
        n, L = len(lengths), int(lengths.max()) if len(lengths) else 0
        self.F = np.full((n, L), -1, dtype=np.int32)
        starts = offsets[:-1]
        ids = np.asarray(attr_ids)
        for j in range(L):
            has = lengths > j
            self.F[has, j] = ids[starts[has] + j]
        self.vid = {t: i for i, t in enumerate(vocab)}

    def nbytes(self) -> int:
        return self.F.nbytes

    def eval(self, node):
        """[N] bool eligibility of a parsed expression."""
        from sterling.model.filter import And, Not, Term

        if isinstance(node, Term):
            v = self.vid.get(node.text)
            if v is None:
                return np.zeros(self.F.shape[0], dtype=bool)
            hit = self.F[:, 0] == v
            for j in range(1, self.F.shape[1]):
                hit |= self.F[:, j] == v
            return hit
        if isinstance(node, Not):
            return ~self.eval(node.child)
        parts = [self.eval(c) for c in node.children]
        acc = parts[0]
        for p in parts[1:]:
            acc = acc & p if isinstance(node, And) else acc | p
        return acc


# ------------------------------------------------------------------ records
def machine() -> str:
    """CPU model and core count, for the record."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def commit() -> str:
    """The short git commit of this checkout, or "unknown"."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------ processes
def start_listening(cmd: list[str], log_path: Path, timeout_s: float = 300.0):
    """Start a ``sterling serve`` / ``launch`` child (stderr appended to ``log_path``, one OpenMP
    thread) and wait, bounded, for its ``listening on HOST:PORT`` line: (process, address)."""
    import queue
    import threading

    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] and None, daemon=True).start()
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if "listening on " in line:
            return proc, line.split("listening on ", 1)[1].split()[0]
    proc.kill()
    proc.wait(timeout=30)
    raise RuntimeError(f"{' '.join(cmd[2:5])} did not start; see {log_path}: {Path(log_path).read_text()[-2000:]}")
