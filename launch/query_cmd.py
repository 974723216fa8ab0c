"""`sterling query`: search a model artifact from the command line."""

from __future__ import annotations

import argparse
import json

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "query",
        help="search a model artifact (top-k ids and scores)",
        description="Search a model artifact. The query is a vector file (--vector) or an item's "
        "own embedding (--like ID).",
    )
    p.add_argument("--model", help="artifact written by `sterling build` (or use --address)")
    p.add_argument("--k", type=int, default=10, help="results per query")
    p.add_argument("--max-k", type=int, default=None,
                   help="with --model: raise the artifact's k limit (default: the artifact's max_k, 262144 unless built otherwise)")
    p.add_argument("--nprobe", type=int, help="lists probed (default nlist/8)")
    p.add_argument("--where", default=None, help='filter, e.g. "lang:en AND NOT policy:blocked"')
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--vector", help=".npy [D] or [B, D], or .json list(s) of floats")
    g.add_argument("--like", type=int, help="use the stored embedding of this item id as the query")
    g.add_argument("--user-ids", help="learned models: comma-separated user ids (rows of the artifact's users table)")
    p.add_argument("--k0", type=int, default=0, help="learned models: candidates the OverArch reranks (0 = default)")
    p.add_argument("--value-formula", default=None, help='learned models: e.g. "click + 2 * like" (default: the '
                   "artifact's)")
    p.add_argument("--approx", action="store_true", help="skip the exact filter re-check (exact=False)")
    p.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    from sterling.cluster.client import add_remote_arguments

    add_remote_arguments(p)  # --address HOST:PORT, --token-file, --tls-ca, --deadline-ms
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sterling.model import RetrievalModel
    from sterling.model.catalog import load_query_vectors
    from sterling.model.errors import InvalidInputError

    if getattr(args, "address", None):
        from sterling.cluster.client import query_remote

        return query_remote(args)
    if not args.model:
        raise InvalidInputError("give --model PATH (local artifact) or --address HOST:PORT (a server)")
    from sterling.model.artifact import read_header

    if read_header(args.model).get("kind") == "learned_retrieval_model":
        return _query_learned(args)
    if args.user_ids or args.k0 or args.value_formula:
        raise InvalidInputError(f"--user-ids, --k0 and --value-formula need a learned model; {args.model} is an "
                                "index model (query it with --vector or --like)")
    model = RetrievalModel.load(args.model)
    index = model.index
    if args.max_k is not None:
        import dataclasses

        if args.max_k < 1:
            raise InvalidInputError(f"--max-k ({args.max_k}) must be ≥ 1")
        index.config = dataclasses.replace(index.config, max_k=args.max_k)
    if args.like is not None:
        pos = (index.item_ids == args.like).nonzero()
        if pos.numel() == 0:
            raise InvalidInputError(f"item id {args.like} is not in {args.model}")
        p = int(pos[0])
        xq = index.codes[p].float() * index.scales[p]
    else:
        xq = torch.from_numpy(load_query_vectors(args.vector))
    out = model(query=xq, k=args.k, nprobe=args.nprobe, where=args.where, exact=not args.approx)
    if args.json:
        for ids, scores in zip(out.ids.tolist(), out.scores.tolist()):
            hits = [{"id": i, "score": s} for i, s in zip(ids, scores) if i >= 0]
            print(json.dumps({"version": out.version, "results": hits}))
        return 0
    from rich.console import Console
    from rich.table import Table

    for q in range(out.ids.shape[0]):
        table = Table(title=f"query {q} (model version {out.version})")
        table.add_column("rank", justify="right")
        table.add_column("id", justify="right")
        table.add_column("score", justify="right")
        table.add_column("attributes")
        for r, (i, s) in enumerate(zip(out.ids[q].tolist(), out.scores[q].tolist())):
            if i < 0:
                break
            slot = int((index.item_ids == i).nonzero()[0])
            a, b = int(index.attr_offsets[slot]), int(index.attr_offsets[slot + 1])
            terms = " ".join(index.vocab[t] for t in index.attr_ids[a:b].tolist())
            table.add_row(str(r + 1), str(i), f"{s:.4f}", terms)
        Console().print(table)
    return 0


def parse_user_ids(text: str) -> list[int]:
    from sterling.model.errors import InvalidInputError

    try:
        ids = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise InvalidInputError(f"--user-ids {text!r}: give comma-separated integers, e.g. 3,17,42") from None
    if not ids:
        raise InvalidInputError("--user-ids is empty; give comma-separated integers, e.g. 3,17,42")
    return ids


def print_learned(ids, values, task_scores, tasks, version: int, *, as_json: bool, extra: dict | None = None) -> None:
    """One line per query: id, value and per-task probabilities of each result."""
    for q in range(len(ids)):
        hits = [{"id": int(i), "value": float(v), **{t: float(task_scores[q][r][j]) for j, t in enumerate(tasks)}}
                for r, (i, v) in enumerate(zip(ids[q], values[q])) if i >= 0]
        if as_json:
            print(json.dumps({"version": version, **(extra or {}), "results": hits}))
        else:
            print(" ".join(f"{h['id']}:{h['value']:.4f}" for h in hits), f"(version {version})")


def _query_learned(args: argparse.Namespace) -> int:
    import torch

    from sterling.model.catalog import load_query_vectors
    from sterling.model.errors import InvalidInputError
    from sterling.model.learned import LearnedRetrievalModel

    model = LearnedRetrievalModel.load(args.model).eval()
    kw = {}
    if args.user_ids:
        kw["user_ids"] = torch.tensor(parse_user_ids(args.user_ids))
    elif args.vector:
        kw["query"] = torch.from_numpy(load_query_vectors(args.vector))
    else:
        raise InvalidInputError("a learned model is queried with --user-ids or --vector (a user embedding)")
    with torch.inference_mode():
        out = model(k=args.k, k0=args.k0 or None, nprobe=args.nprobe, where=args.where,
                    value_formula=args.value_formula, exact=not args.approx, **kw)
    print_learned(out.ids.tolist(), out.values.tolist(), out.task_scores.tolist(), model.tasks, out.version,
                  as_json=args.json)
    return 0
