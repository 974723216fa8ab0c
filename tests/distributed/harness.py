"""An in-repo multi-process gloo harness: real ranks, a real process group, every exit code checked.

``run_group(world, fn, *args)`` spawns ``world`` processes (``torch.multiprocessing``,
start method ``spawn``), each of which joins one gloo group on a free loopback
port and calls ``fn(rank, world, *args)``. A rank that raises fails the
caller with that rank's traceback (``ProcessRaisedException``).
"""

from __future__ import annotations

import os
import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_group"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_DEVICE_TRANSPORT="TCP",
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), TQDM_DISABLE="1")
    from sterling.sharding.group import set_rank_threads

    set_rank_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def run_group(world: int, fn, *args, timeout_s: float = 300.0) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` gloo ranks; raises if any rank fails."""
    ctx = mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            for p in ctx.processes:
                p.kill()
            raise TimeoutError(f"the {world}-rank group did not finish within {timeout_s} s")
