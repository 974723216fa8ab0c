"""`sterling train`: interactions (+ users, items) Parquet → one learned-model artifact + JSON metrics."""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train towers, index, OverArch and heads; write ONE artifact",
        description="Two-tower training (in-batch + sampled negatives, logQ correction), index build from the "
        "item tower, OverArch + heads on retrieved hard negatives. Files: see docs/data.md.",
    )
    p.add_argument("--interactions", required=True, help="interactions .parquet (user_id, item_id, [timestamp], tasks…)")
    p.add_argument("--users", help="users .parquet (user_id + features)")
    p.add_argument("--items", help="items .parquet (item_id + features + attributes)")
    p.add_argument("--out", required=True, help="artifact to write, e.g. model.st")
    p.add_argument("--config", help="YAML file of TrainConfig keys (dim, overarch, k0, tower_epochs, …)")
    p.add_argument("--eval-fraction", type=float, help="held-out fraction per user, by time (default 0.1)")
    p.add_argument("--overarch", help="dot, mlp, mol or attention (default mol)")
    p.add_argument("--seed", type=int)
    p.add_argument("--list-slack", type=float,
                   help="spare slots per IVF list for streaming upserts, a fraction of its items (default 0.125)")
    p.add_argument("--k", type=int, default=100, help="k of the held-out recall@k / NDCG@k")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def load_config(args: argparse.Namespace):
    from sterling.model.errors import InvalidInputError
    from sterling.model.train import TrainConfig

    d: dict = {}
    if args.config:
        import yaml

        try:
            with open(args.config) as f:
                d = yaml.safe_load(f) or {}
        except (OSError, yaml.YAMLError) as e:
            raise InvalidInputError(f"cannot read training config {args.config}: {e}") from e
        if not isinstance(d, dict):
            raise InvalidInputError(f"{args.config} must hold a mapping of TrainConfig keys, got {type(d).__name__}")
    for key, val in (("eval_fraction", args.eval_fraction), ("overarch", args.overarch), ("seed", args.seed),
                     ("list_slack", args.list_slack)):
        if val is not None:
            d[key] = val
    d.setdefault("progress", not args.quiet)
    return TrainConfig.from_dict(d)


def run(args: argparse.Namespace) -> int:
    import torch

    from sterling.model.data import read_features, read_interactions
    from sterling.model.train import train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args)
    inter = read_interactions(args.interactions)
    users = read_features(args.users, "user_id") if args.users else None
    items = read_features(args.items, "item_id") if args.items else None
    model, _, log = train(inter, users, items, cfg, evaluate_k=args.k)
    model.save(args.out)
    log.pop("config", None)
    log["artifact"] = str(args.out)
    print(json.dumps(log))
    return 0
