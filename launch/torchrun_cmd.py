"""`sterling launch torchrun`: one model over N ranks of one host, served over gRPC from rank 0.

Starts the ranks through ``torch.distributed.run`` (the elastic agent behind
``torchrun``), so the same worker also runs as
``torchrun --standalone --nproc-per-node N -m sterling.launch.worker --model m.st``.
Each rank memory-maps its own slice of whole IVF lists (``sharding.ranks``);
gloo on CPU, NCCL on GPU, chosen by the worker. A rank that dies stops the
group (or restarts it, with ``--max-restarts``); the launcher then exits
non-zero and names the rank.
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["register_torchrun", "run_torchrun", "torchrun_argv", "describe_failures"]


def register_torchrun(kinds: argparse._SubParsersAction) -> None:
    from sterling.launch.worker import add_worker_arguments

    t = kinds.add_parser(
        "torchrun",
        help="N ranks on this host (torch.distributed.run), one slice each, gRPC from rank 0",
        description="Start --nproc-per-node ranks with torch.distributed.run; each searches its own "
        "slice of whole IVF lists, rank 0 merges exactly and serves sterling.v1.Retrieval. "
        "Equivalent: torchrun --standalone --nproc-per-node N -m sterling.launch.worker --model M.",
    )
    t.add_argument("--nproc-per-node", type=int, required=True, help="ranks on this host (one per GPU on GPUs)")
    t.add_argument("--max-restarts", type=int, default=0,
                   help="times the elastic agent restarts the whole group after a rank fails")
    t.add_argument("--monitor-interval", type=float, default=0.5, help="seconds between the agent's rank checks")
    add_worker_arguments(t)
    t.set_defaults(func=run_torchrun)


def _worker_args(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model, "--host", args.host, "--port", str(args.port), "--threads", str(args.threads),
           "--max-k", str(args.max_k), "--max-batch", str(args.max_batch), "--max-results", str(args.max_results),
           "--deadline-ms", str(args.deadline_ms), "--workers", str(args.workers), "--max-queue", str(args.max_queue),
           "--max-queue-wait-ms", str(args.max_queue_wait_ms),
           "--max-client-in-flight", str(args.max_client_in_flight), "--max-message-mb", str(args.max_message_mb),
           "--log-format", args.log_format]
    for name in ("plan", "ranks_dir", "query_sample", "metrics_port", "tls_cert", "tls_key", "tls_client_ca",
                 "token_file"):
        v = getattr(args, name, None)
        if v is not None:
            out += [f"--{name.replace('_', '-')}", str(v)]
    if args.adaptive:
        out.append("--adaptive")
    return out


def torchrun_argv(args: argparse.Namespace) -> list[str]:
    """The ``torchrun`` command line this launch runs (printed, and parsed by ``torch.distributed.run``)."""
    return ["--standalone", "--nnodes", "1", "--nproc-per-node", str(args.nproc_per_node),
            "--max-restarts", str(args.max_restarts), "--monitor-interval", str(args.monitor_interval),
            "-m", "sterling.launch.worker", *_worker_args(args)]


def describe_failures(err) -> str:
    """One line per failed rank of a ``ChildFailedError``: rank, pid, exit code or signal."""
    lines = []
    for rank, f in sorted(err.failures.items()):
        how = f"signal {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"
        lines.append(f"rank {rank} (local rank {f.local_rank}, pid {f.pid}) failed with {how}")
    return "; ".join(lines)


def run_torchrun(args: argparse.Namespace) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from sterling.cluster.errors import ClusterConfigError
    from sterling.launch.serve_cmd import check_servable

    if args.nproc_per_node < 1:
        raise ClusterConfigError(f"--nproc-per-node ({args.nproc_per_node}) must be ≥ 1")
    if args.max_restarts < 0:
        raise ClusterConfigError(f"--max-restarts ({args.max_restarts}) must be ≥ 0")
    check_servable(args.model)
    argv = torchrun_argv(args)
    print("sterling launch torchrun: torchrun " + " ".join(argv), file=sys.stderr, flush=True)
    try:
        run(get_args_parser().parse_args(argv))
    except SignalException as e:  # SIGINT / SIGTERM: the agent has stopped every rank; a clean stop
        print(f"sterling launch torchrun: stopped ({e.sigval.name})", file=sys.stderr, flush=True)
        return 0
    except ChildFailedError as e:
        print(f"sterling launch torchrun: error: {describe_failures(e)}; the process group was stopped"
              + (f" after {args.max_restarts} restart(s)" if args.max_restarts else
                 " (--max-restarts N restarts it automatically)"), file=sys.stderr, flush=True)
        return 1
    return 0
