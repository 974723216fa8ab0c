"""`sterling eval`: a learned-model artifact + test interactions → recs.parquet and recall@k / NDCG@k."""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="rank test users with both stages (ann, full) and print recall@k / NDCG@k",
        description="Users are looked up in the users table shipped in the artifact (their features and "
        "training history). Writes user_id, stage, rank, item_id, score rows.",
    )
    p.add_argument("--model", required=True, help="artifact written by `sterling train`")
    p.add_argument("--test", required=True, help="test interactions .parquet (same layout as training)")
    p.add_argument("--users", help="users .parquet: checked to contain every test user")
    p.add_argument("--items", help="items .parquet: checked to contain every test item")
    p.add_argument("--exclude", help="interactions .parquet whose (user, item) pairs are dropped from the ranking")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--k0", type=int, help="candidates the OverArch reranks (default: the model's)")
    p.add_argument("--value-formula", help="Value Model formula over task names (default: the model's)")
    p.add_argument("--out", help="recs .parquet to write")
    p.add_argument("--json", action="store_true", help="print metrics as one JSON line (default: a table)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from sterling.model.data import (
        check_references,
        read_features,
        read_interactions,
        write_parquet,
    )
    from sterling.model.learned import LearnedRetrievalModel
    from sterling.model.train import evaluate_interactions

    model = LearnedRetrievalModel.load(args.model)
    test = read_interactions(args.test)
    check_references(
        test,
        users=read_features(args.users, "user_id") if args.users else None,
        items=read_features(args.items, "item_id") if args.items else None,
    )
    exclude = read_interactions(args.exclude) if args.exclude else None
    metrics, (users, recs) = evaluate_interactions(
        model, test, k=args.k, k0=args.k0 or model.k0, exclude=exclude, formula=args.value_formula
    )
    if args.out:
        cols: dict[str, list] = {"user_id": [], "stage": [], "rank": [], "item_id": [], "score": []}
        for stage, (ids, scores) in recs.items():
            valid = ids >= 0
            r, c = np.nonzero(valid)
            cols["user_id"].append(users[r])
            cols["stage"] += [stage] * len(r)
            cols["rank"].append(c.astype(np.int64))
            cols["item_id"].append(ids[r, c].astype(np.int64))
            cols["score"].append(scores[r, c].astype(np.float32))
        write_parquet(args.out, {k: (v if k == "stage" else np.concatenate(v)) for k, v in cols.items()})
    if args.json:
        print(json.dumps(metrics))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"{args.model}: held-out quality at k={args.k}")
        for col in ("stage", "task", f"recall@{args.k}", f"ndcg@{args.k}", "users"):
            table.add_column(col)
        for stage, per_task in metrics.items():
            for task, m in per_task.items():
                table.add_row(stage, task, f"{m[f'recall@{args.k}']:.4f}", f"{m[f'ndcg@{args.k}']:.4f}", str(m["users"]))
        Console().print(table)
    return 0
