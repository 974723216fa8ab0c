"""`sterling launch torchrun` argument handling (no processes started)."""

from __future__ import annotations

import pytest

from sterling.cluster.errors import ClusterConfigError
from sterling.launch.cli import build_parser, main
from sterling.launch.torchrun_cmd import describe_failures, torchrun_argv


def _args(*extra):
    return build_parser().parse_args(["launch", "torchrun", "--nproc-per-node", "3", "--model", "m.st", *extra])


def test_torchrun_argv_passes_restarts_and_server_flags_to_the_worker():
    argv = torchrun_argv(_args("--max-restarts", "2", "--port", "0", "--plan", "p.json", "--max-k", "500"))
    assert argv[:2] == ["--standalone", "--nnodes"]
    assert argv[argv.index("--nproc-per-node") + 1] == "3" and argv[argv.index("--max-restarts") + 1] == "2"
    worker = argv[argv.index("-m") + 1 :]
    assert worker[0] == "sterling.launch.worker"
    for flag, value in (("--model", "m.st"), ("--port", "0"), ("--plan", "p.json"), ("--max-k", "500")):
        assert worker[worker.index(flag) + 1] == value
    import argparse

    from sterling.launch.worker import add_worker_arguments

    p = argparse.ArgumentParser()
    add_worker_arguments(p)
    parsed = p.parse_args(worker[1:])  # the worker accepts exactly what the launcher passes
    assert parsed.max_k == 500 and parsed.plan == "p.json"


def test_bad_launch_numbers_are_refused_with_typed_errors(capsys):
    assert main(["launch", "torchrun", "--nproc-per-node", "0", "--model", "m.st"]) == 2
    assert "--nproc-per-node (0)" in capsys.readouterr().err
    from sterling.launch.torchrun_cmd import run_torchrun

    with pytest.raises(ClusterConfigError):
        run_torchrun(_args("--max-restarts", "-1"))


def test_failures_are_described_by_rank_pid_and_signal():
    class F:
        def __init__(self, local_rank, pid, exitcode):
            self.local_rank, self.pid, self.exitcode = local_rank, pid, exitcode

        def signal_name(self):
            return "SIGKILL"

    class E:
        failures = {1: F(1, 4242, -9), 0: F(0, 4241, 3)}

    text = describe_failures(E())
    assert text == ("rank 0 (local rank 0, pid 4241) failed with exit code 3; "
                    "rank 1 (local rank 1, pid 4242) failed with signal SIGKILL")
