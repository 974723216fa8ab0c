"""Fork server for the crash test: forks writer processes for the test to SIGKILL.

Imports torch and Sterling once, then for every ``round`` line on stdin forks
a child that recovers ``DIR`` (``LiveModel.open``), then writes deterministic
batches (``batch(seed, seq)``) forever while a thread snapshots (back to back or
after up to 80 ms); after each acknowledged batch it prints ``ACK <seq>``. The
test reads ``PID``/``READY``/``ACK`` lines, kills the child with SIGKILL at a
random moment, and the harness prints ``DONE`` once the child is reaped.

Usage: python -m tests.crash_harness BASE_MODEL DATA_DIR SEED
"""

from __future__ import annotations

import os
import random
import sys
import threading
import time

import torch

D = 8
TERMS = [f"t{a}:v{b}" for a in range(3) for b in range(3)]


def batch(seed: int, seq: int):
    """The seq-th batch of the stream: ("upsert", ids, vectors, attributes) or ("delete", ids)."""
    r = random.Random(seed * 1_000_003 + seq)
    n = r.randint(1, 40)
    ids = r.sample(range(1500), n)
    if r.random() < 0.3:
        return ("delete", ids)
    g = torch.Generator().manual_seed(seed * 7919 + seq)
    x = torch.randn(n, D, generator=g)
    attrs = [sorted(r.sample(TERMS, r.randint(0, 3))) for _ in ids]
    return ("upsert", ids, x, attrs)


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def _child(base: str, data_dir: str, seed: int) -> None:
    from sterling.model.live import LiveModel

    live = LiveModel.open(base, LiveModel.Config(data_dir=data_dir, compact_waste=0.5))
    _say(f"READY {live.applied_seq}")

    def snapshots():  # often enough to be killed mid-snapshot, rarely enough to leave log after it
        r = random.Random(os.getpid())
        while True:
            if r.random() < 0.5:
                time.sleep(r.uniform(0.0, 0.08))
            live.snapshot()

    threading.Thread(target=snapshots, daemon=True).start()
    while live.applied_seq < 100_000:
        b = batch(seed, live.applied_seq + 1)
        if b[0] == "delete":
            live.delete(b[1])
        else:
            live.upsert(b[1], b[2], b[3])
        _say(f"ACK {live.applied_seq}")


def main() -> None:
    base, data_dir, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)  # no OpenMP pool in the forking process
    import sterling.model.live  # noqa: F401  (imported before forking)

    for line in sys.stdin:
        if line.strip() != "round":
            continue
        pid = os.fork()
        if pid == 0:
            try:
                _child(base, data_dir, seed)
            finally:
                os._exit(0)
        _say(f"PID {pid}")
        os.waitpid(pid, 0)
        _say("DONE")


if __name__ == "__main__":
    main()
