"""`sterling update`: bulk upserts and deletes to a running server, from Parquet files."""

from __future__ import annotations

import argparse
import json

__all__ = ["register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "update",
        help="send upserts / deletes from Parquet to a server started with --data-dir",
        description="Stream upserts (Parquet: id int64, embedding list<float>, optional attributes "
        "list<string>; for a learned model the items-table layout of docs/data.md: item_id, feature columns, "
        "optional attributes, embedded by the server's item tower) in batches — each batch atomic and durable once acknowledged — then delete the ids "
        "of --deletes (Parquet with an `id` column). Prints the final model version.",
    )
    p.add_argument("--address", required=True, help="HOST:PORT of `sterling serve --data-dir`")
    p.add_argument("--upserts", help="Parquet with id, embedding[, attributes]; learned models: an items table")
    p.add_argument("--deletes", help="Parquet with an id column")
    p.add_argument("--batch", type=int, default=1000, help="items per atomic batch")
    p.add_argument("--token-file", help="file holding the bearer token")
    p.add_argument("--tls-ca", help="CA certificate (PEM) of a TLS server")
    p.add_argument("--timeout-s", type=float, default=600.0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def _batches(path: str, batch: int, bar):
    """(ids, embeddings [n, D], attributes or None) per ``batch`` rows of an upsert Parquet file."""
    import numpy as np
    import pyarrow.parquet as pq

    from sterling.model.errors import InvalidInputError

    f = pq.ParquetFile(path)
    names = set(f.schema_arrow.names)
    if "item_id" in names and "embedding" not in names:  # the items-table layout: a learned model's features
        from sterling.model.data import read_feature_batches

        for table in read_feature_batches(path, "item_id", batch):
            yield table.ids, table, table.attributes
            bar.update(len(table))
        return
    if not {"id", "embedding"} <= names:
        raise InvalidInputError(f"{path} has columns {sorted(names)}; upserts need `id` and `embedding` "
                                "(and optionally `attributes`), or — for a learned model — the items-table layout "
                                "of docs/data.md (`item_id`, feature columns, optional `attributes`)")
    cols = ["id", "embedding"] + (["attributes"] if "attributes" in names else [])
    for rb in f.iter_batches(batch_size=batch, columns=cols):
        ids = rb.column("id").to_numpy()
        emb = rb.column("embedding")
        x = np.asarray(emb.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(len(ids), -1)
        attrs = rb.column("attributes").to_pylist() if "attributes" in cols else None
        if attrs is not None:
            attrs = [a or [] for a in attrs]
        yield ids, x, attrs
        bar.update(len(ids))


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from sterling.cluster.client import Client
    from sterling.model.errors import InvalidInputError

    if not args.upserts and not args.deletes:
        raise InvalidInputError("give --upserts U.parquet and/or --deletes D.parquet")
    if args.batch < 1:
        raise InvalidInputError(f"--batch ({args.batch}) must be ≥ 1")
    token = Path(args.token_file).read_text().strip() if args.token_file else None
    ca = Path(args.tls_ca).read_bytes() if args.tls_ca else None
    out = {}
    with Client(args.address, token=token, root_certificates=ca, timeout_s=args.timeout_s) as client:
        if args.upserts:
            total = pq.ParquetFile(args.upserts).metadata.num_rows
            with tqdm(total=total, desc="upserts", unit="item", disable=args.no_progress) as bar:
                r = client.upsert(_batches(args.upserts, args.batch, bar))
            out.update(upserted=r.upserted, model_version=r.model_version)
        if args.deletes:
            ids = pq.read_table(args.deletes, columns=["id"]).column("id").to_numpy()
            deleted = 0
            with tqdm(total=len(ids), desc="deletes", unit="item", disable=args.no_progress) as bar:
                for s in range(0, len(ids), args.batch):
                    r = client.delete(ids[s : s + args.batch])
                    deleted += r.deleted
                    bar.update(min(args.batch, len(ids) - s))
            out.update(deleted=deleted, model_version=r.model_version)
    print(json.dumps(out), flush=True)
    return 0
