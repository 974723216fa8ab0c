"""Rank entry points for the process-group tests (importable, so ``spawn`` can start them)."""

from __future__ import annotations

import numpy as np
import torch


def _result(out) -> dict:
    if hasattr(out, "task_scores"):
        return {"ids": out.ids.numpy(), "values": out.values.numpy(), "task_scores": out.task_scores.numpy(),
                "ann_ids": out.ann_ids.numpy(), "ann_scores": out.ann_scores.numpy(), "version": out.version}
    return {"ids": np.asarray(out.ids), "scores": np.asarray(out.scores), "u": out.u.numpy(), "version": out.version,
            "counts": getattr(out, "counts", None)}


def serve_cases(rank: int, world: int, jobs: list, out_path: str) -> None:
    """For each (rank_dir, tower_sharding, cases): load this rank's slice; rank 0 runs the cases, others serve.

    Rank 0 writes ``{job: [result per case]}`` (numpy) to ``out_path``; a case
    that raises is recorded as ``{"error": type name}``.
    """
    from sterling.sharding.group import RankGroup

    results = {}
    for j, (rank_dir, sharding, cases) in enumerate(jobs):
        g = RankGroup.load(rank_dir, tower_sharding=sharding)
        if rank != 0:
            g.serve()
            continue
        rows = []
        try:
            for method, kwargs in cases:
                try:
                    if method == "infos":
                        rows.append({"infos": g.shard_infos()})
                    else:
                        rows.append(_result(getattr(g, method)(**kwargs)))
                except Exception as e:  # typed errors are part of the contract under test
                    rows.append({"error": type(e).__name__})
        finally:
            g.stop()
        results[j] = rows
    if rank == 0:
        torch.save(results, out_path)
