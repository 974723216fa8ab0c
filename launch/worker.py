"""One rank of `sterling launch torchrun`: ``torchrun --nproc-per-node N -m sterling.launch.worker --model m.st``.

Every rank joins the process group (NCCL with CUDA, else gloo), memory-maps
its own slice (rank 0 writes the slices once, next to the model, unless a
current set is there) and searches it; rank 0 also serves
``sterling.v1.Retrieval`` over gRPC with the existing ``RetrievalServer``,
whose router sees the whole group as one shard that answers already merged
(``GroupBackend``). A learned model is served the same way as by ``sterling
serve``: the router's ``LearnedHead`` runs the user tower and reranks the
merged K0 candidates (OverArch, heads, Value Model) on rank 0.

The same worker is ranks 1..N-1 of a Ray shard actor's group (``sterling
launch ray --ranks-per-host N``, ``cluster.group_shard``): there the actor
is rank 0, and ``STERLING_PARENT_PID`` makes a rank exit once it is gone.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import os
import sys
import threading
import time
from pathlib import Path

import torch

from sterling.cluster.backends import ShardBackend
from sterling.cluster.shard import ShardReply, ShardRequest
from sterling.launch.serve_cmd import add_server_arguments

__all__ = ["GroupBackend", "add_worker_arguments", "ensure_rank_slices", "main"]


class GroupBackend(ShardBackend):
    """The router's view of a process group: one "shard" whose reply is the exact merge over all ranks.

    ``fan_out`` runs one collective request on rank 0's ``RankGroup``
    (requests are serialised: one collective at a time); a rank that died
    makes it fail, and the router answers UNAVAILABLE.
    """

    def __init__(self, group) -> None:
        super().__init__([1])
        self.group = group
        self._pool = cf.ThreadPoolExecutor(max_workers=2, thread_name_prefix="sterling-group")
        self._infos = group.shard_infos()

    def _search(self, req: ShardRequest) -> ShardReply:
        t0 = time.perf_counter()
        res = self.group.search(req.xq, k=req.k, nprobe=req.nprobe, where=req.where, exact=req.exact,
                                counts=req.counts, skip_lists=req.skip_lists)
        return ShardReply(shard=0, replica=0, ids=res.ids, scores=res.scores, version=res.version,
                          ms=(time.perf_counter() - t0) * 1e3, counts=res.counts)

    def _submit(self, shard: int, replica: int, req: ShardRequest) -> cf.Future:
        return self._pool.submit(self._search, req)

    def _wait(self, handles, timeout: float):
        done, _ = cf.wait(handles, timeout=timeout, return_when=cf.FIRST_COMPLETED)
        return list(done)

    def _result(self, handle):
        return handle.result()

    def _probe(self, shard: int, replica: int, timeout: float) -> bool:
        return not self.group._stopped

    def shard_infos(self) -> list[dict]:
        return [dict(i) for i in self._infos]

    def close(self) -> None:
        super().close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def add_worker_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="artifact written by `sterling build`")
    p.add_argument("--plan", help="plan JSON (`sterling plan --out`): its shards are the ranks' list ranges")
    p.add_argument("--ranks-dir", help="where the per-rank slices are (or go); default <model>.ranks-N/")
    p.add_argument("--query-sample", help=".npy [n, D] queries: balance the ranks by their probe load too")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    add_server_arguments(p)


def ensure_rank_slices(model: Path, out: Path, *, world_size: int, plan=None, plan_path=None, sample=None,
                       ranges=None):
    """The rank manifest in ``out``: reused when written from this model (not modified since) for this world size
    (and, given ``ranges``, these rank list ranges)."""
    from sterling.sharding.documents import MANIFEST_NAME, read_manifest
    from sterling.sharding.ranks import write_rank_slices

    if (out / MANIFEST_NAME).exists():
        m = read_manifest(out)
        if (m.num_shards == world_size and Path(m.source) == model and m.plan == plan_path
                and (ranges is None or [tuple(s.lists) for s in m.shards] == [tuple(r) for r in ranges])
                and all(Path(s.path).exists() for s in m.shards)
                and model.stat().st_mtime <= (out / MANIFEST_NAME).stat().st_mtime):
            return m
    xq = None
    if sample is not None:
        import numpy as np

        xq = torch.from_numpy(np.load(sample).astype("float32"))
    return write_rank_slices(model, out, world_size=None if plan is not None else world_size, plan=plan,
                             plan_path=plan_path, xq_sample=xq, ranges=ranges)


def _exit_with_parent(parent: int) -> None:
    """A rank started by a group shard (``cluster.group_shard``) exits when its rank 0 process is gone."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, name="sterling-parent-watch", daemon=True).start()


def _say(msg: str) -> None:
    print(f"sterling worker: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    import torch.distributed as dist

    from sterling.cluster.errors import ClusterConfigError
    from sterling.launch.serve_cmd import (
        check_servable,
        router_config_from_args,
        server_config_from_args,
    )
    from sterling.model.artifact import read_header
    from sterling.sharding.group import RankGroup, backend_for_device, set_rank_threads

    p = argparse.ArgumentParser(prog="sterling.launch.worker", description=__doc__)
    add_worker_arguments(p)
    args = p.parse_args(argv)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise ClusterConfigError("sterling.launch.worker runs under torchrun (RANK / WORLD_SIZE are not set); "
                                 "use `sterling launch torchrun --nproc-per-node N --model M`")
    if os.environ.get("STERLING_PARENT_PID"):
        _exit_with_parent(int(os.environ["STERLING_PARENT_PID"]))
    set_rank_threads(args.threads)
    backend, device = backend_for_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # idle ranks wait in a collective for the next request: no collective timeout (a dead rank is the
    # elastic agent's to notice, not a timeout's)
    timeout = datetime.timedelta(days=365)
    store, rank, world = next(dist.rendezvous("env://", timeout=datetime.timedelta(minutes=10)))
    # after an elastic restart the agent's store still holds the dead round's gloo addresses: a fresh prefix
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"sterling/restart-{restart}", store), rank=rank,
                            world_size=world, timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = Path(args.model)
    out = Path(args.ranks_dir) if args.ranks_dir else Path(f"{model}.ranks-{world}")
    if rank == 0:
        check_servable(args.model)
        plan = None
        if args.plan:
            from sterling.planner.io import load_plan

            plan = load_plan(args.plan)
        ensure_rank_slices(model, out, world_size=world, plan=plan, plan_path=args.plan, sample=args.query_sample)
    dist.barrier()
    group = RankGroup.load(out, device=device)
    _say(f"rank {rank} pid {os.getpid()} ready (lists [{group.info.lists[0]}, {group.info.lists[1]}), "
         f"{backend}, {device})")
    if rank != 0:
        group.serve()
        dist.destroy_process_group()
        return 0

    from sterling.cluster.router import Router
    from sterling.cluster.server import RetrievalServer
    from sterling.model.retrieval import RetrievalModel
    from sterling.sharding.documents import read_manifest

    learned = None
    if read_header(model)["kind"] == "learned_retrieval_model":
        # towers, OverArch, heads and item cache from the whole (memory-mapped) artifact: the head reranks the
        # merged K0 and needs the whole index's numbers (slots, items) for K0 → nprobe
        from sterling.cluster.learned_head import LearnedHead
        from sterling.model.learned import LearnedRetrievalModel
        from sterling.sharding.documents import slice_index

        full = LearnedRetrievalModel.load(model, verify=False)
        learned = LearnedHead(full)
        head = RetrievalModel(slice_index(full.index, (0, 0)))
    else:
        head = RetrievalModel.load(read_manifest(out).head)
    router = Router(head, GroupBackend(group), router_config_from_args(args), learned=learned)
    srv = RetrievalServer(router, server_config_from_args(args), backend_name="torchrun").start()
    print(f"sterling launch torchrun: listening on {srv.address} ({world} ranks, {backend}, slices in {out}/); "
          "Ctrl-C to stop", flush=True)

    def stop_group() -> None:
        try:
            group.stop()
        except RuntimeError as e:  # a peer already gone (the agent is stopping the group)
            _say(f"rank 0: the other ranks are gone ({str(e).splitlines()[0][:120]})")

    def release() -> None:  # a dead peer could block the stop broadcast: bounded
        t = threading.Thread(target=stop_group, daemon=True)
        t.start()
        t.join(5.0)

    srv.wait_for_signal(on_stop=release)
    return 0


if __name__ == "__main__":
    from sterling.model.errors import SterlingError

    try:
        sys.exit(main())
    except SterlingError as e:
        print(f"sterling worker: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
