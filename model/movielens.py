"""MovieLens-100k from the installed ``recbole`` wheel, converted to the Parquet layout of docs/data.md.

``pip install --no-deps recbole==1.2.1`` ships ``dataset_example/ml-100k``
(TSV with typed headers). We only read those files — recbole itself is never
imported — and never copy them into the repository. Tasks: ``watch`` (every
rating) and ``like`` (rating ≥ 4).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from sterling.model.data import DataError, write_parquet

__all__ = ["movielens_100k_dir", "write_movielens_100k"]


def movielens_100k_dir() -> Path:
    spec = importlib.util.find_spec("recbole")
    if spec is None or spec.origin is None:
        raise DataError(
            "MovieLens-100k is read from the recbole wheel, which is not installed; "
            "run `pip install --no-deps recbole==1.2.1`"
        )
    d = Path(spec.origin).parent / "dataset_example" / "ml-100k"
    if not (d / "ml-100k.inter").exists():
        raise DataError(f"{d} does not hold ml-100k.inter; reinstall recbole==1.2.1")
    return d


def _tsv(path: Path) -> tuple[list[str], list[list[str]]]:
    lines = path.read_text(encoding="latin-1").splitlines()
    header = [h.split(":")[0] for h in lines[0].split("\t")]
    return header, [ln.split("\t") for ln in lines[1:] if ln]


def write_movielens_100k(out_dir: str | Path) -> dict[str, Path]:
    """Convert ml-100k to interactions/users/items Parquet files in ``out_dir``."""
    d = movielens_100k_dir()
    out = Path(out_dir)
    _, rows = _tsv(d / "ml-100k.inter")
    arr = np.array(rows, dtype=np.float64)
    rating = arr[:, 2]
    paths = {n: out / f"{n}.parquet" for n in ("interactions", "users", "items")}
    write_parquet(
        paths["interactions"],
        {
            "user_id": arr[:, 0].astype(np.int64),
            "item_id": arr[:, 1].astype(np.int64),
            "timestamp": arr[:, 3].astype(np.int64),
            "watch": np.ones(len(arr), np.float32),
            "like": (rating >= 4).astype(np.float32),
        },
    )
    _, urows = _tsv(d / "ml-100k.user")
    write_parquet(
        paths["users"],
        {
            "user_id": np.array([int(r[0]) for r in urows], np.int64),
            "age": np.array([int(r[1]) // 10 for r in urows], np.int64),
            "gender": [r[2] for r in urows],
            "occupation": [r[3] for r in urows],
            "zip3": [r[4][:3] for r in urows],
        },
    )
    _, irows = _tsv(d / "ml-100k.item")
    genres = [r[3].split() if len(r) > 3 else [] for r in irows]
    years = [r[2] if len(r) > 2 and r[2] else "unknown" for r in irows]
    write_parquet(
        paths["items"],
        {
            "item_id": np.array([int(r[0]) for r in irows], np.int64),
            "genre": genres,
            "decade": [y[:3] + "0s" if y != "unknown" else y for y in years],
            "attributes": [[f"genre:{g}" for g in gs] + [f"decade:{y[:3]}0s"] for gs, y in zip(genres, years)],
        },
    )
    return paths
