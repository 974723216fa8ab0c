"""Readers and writers in parallel threads: every result is the exact answer at some version.

Oracle: the committed batches, sorted by the version each returned, replayed
one by one on a copy of the starting model; after each, the searches the
readers ran at that version are recomputed and must match exactly.
Runs ``STERLING_STREAM_SECONDS`` seconds (default 5; the issue's 30 s run:
``STERLING_STREAM_SECONDS=30``).
"""

from __future__ import annotations

import copy
import os
import random
import threading
import time
from collections import defaultdict

import torch

from sterling.model import IndexConfig, RetrievalModel, build_index
from sterling.model.live import LiveModel

D = 16
TERMS = ["a:0", "a:1", "b:0", "b:1"]
FILTERS = [None, "a:0", "NOT b:1", "a:1 OR b:0"]


def test_concurrent_queries_see_whole_batches_only(tmp_path):
    seconds = float(os.environ.get("STERLING_STREAM_SECONDS", "5"))
    g = torch.Generator().manual_seed(0)
    n = 3000
    rng0 = random.Random(0)
    model = RetrievalModel(build_index(
        torch.randn(n, D, generator=g), attributes=[rng0.sample(TERMS, rng0.randint(0, 2)) for _ in range(n)],
        config=IndexConfig(nlist=16, list_slack=0.05),
    ))
    start = copy.deepcopy(model)
    live = LiveModel.open(model, LiveModel.Config(data_dir=tmp_path / "data", compact_waste=0))
    queries = torch.randn(6, D, generator=g)
    seen: list[tuple[int, int, int, list[int]]] = []
    committed: list[tuple[int, tuple]] = []
    stop = time.monotonic() + seconds
    errors: list[BaseException] = []

    def reader(seed):
        r = random.Random(seed)
        try:
            while time.monotonic() < stop:
                q, f = r.randrange(len(queries)), r.randrange(len(FILTERS))
                out = live(query=queries[q : q + 1], k=20, nprobe=4, where=FILTERS[f])
                seen.append((out.version, q, f, out.ids[0].tolist()))
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)

    def writer(seed):
        r = random.Random(seed)
        try:
            while time.monotonic() < stop:
                m = r.randint(1, 60)
                ids = r.sample(range(2 * n), m)
                if r.random() < 0.35:
                    committed.append((live.delete(ids), ("delete", ids)))
                else:
                    x = torch.randn(m, D, generator=torch.Generator().manual_seed(r.randrange(1 << 30)))
                    attrs = [r.sample(TERMS, r.randint(0, 2)) for _ in ids]
                    committed.append((live.upsert(ids, x, attrs), ("upsert", ids, x, attrs)))
                if seed == 100 and r.random() < 0.02:
                    live.compact()  # layout changes under the readers too
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in (1, 2)]
    threads += [threading.Thread(target=writer, args=(s,)) for s in (100, 101)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    live.close()
    assert not errors, errors
    committed.sort(key=lambda c: c[0])
    v0 = int(start.index.version)
    assert [v for v, _ in committed] == list(range(v0 + 1, v0 + 1 + len(committed)))
    want = defaultdict(set)
    for v, q, f, _ in seen:
        want[v].add((q, f))
    oracle = LiveModel.open(start, LiveModel.Config(compact_waste=0))
    answers = {}

    def record(v):
        for q, f in want.get(v, ()):
            answers[v, q, f] = oracle(query=queries[q : q + 1], k=20, nprobe=4, where=FILTERS[f]).ids[0].tolist()

    record(v0)
    for v, op in committed:
        if op[0] == "delete":
            oracle.delete(op[1])
        else:
            oracle.upsert(op[1], op[2], op[3])
        assert oracle.version == v
        record(v)
    assert len(seen) > 50 and len(committed) > 20
    versions = {v for v, *_ in seen}
    assert len(versions) > 10  # the readers really did run across many versions
    for v, q, f, ids in seen:
        assert ids == answers[v, q, f], (v, q, f)
