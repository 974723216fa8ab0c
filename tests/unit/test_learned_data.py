"""The Parquet data layer of the learned model: typed errors, vocabularies, CSR gathers, time splits."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sterling.model.data import (
    DataError,
    Vocab,
    check_references,
    csr_take,
    read_features,
    read_interactions,
)
from sterling.model.errors import SterlingError
from sterling.model.train import split_by_time


def _write(tmp_path, name, cols):
    path = tmp_path / name
    pq.write_table(pa.table(cols), path)
    return path


def _inter(**over):
    cols = {
        "user_id": pa.array([1, 1, 2], pa.int64()),
        "item_id": pa.array([10, 11, 10], pa.int64()),
        "timestamp": pa.array([5, 6, 7], pa.int64()),
        "click": pa.array([1.0, 0.0, 1.0], pa.float32()),
    }
    cols.update(over)
    return {k: v for k, v in cols.items() if v is not None}


def test_good_interactions_read_with_tasks(tmp_path):
    inter = read_interactions(_write(tmp_path, "i.parquet", _inter(like=pa.array([0, 1, 0], pa.float32()))))
    assert list(inter.tasks) == ["click", "like"]
    assert inter.user_id.tolist() == [1, 1, 2] and inter.timestamp.tolist() == [5, 6, 7]


@pytest.mark.parametrize(
    "cols",
    [
        _inter(user_id=None),  # missing id column
        _inter(item_id=pa.array(["a", "b", "c"])),  # wrong id type
        _inter(click=pa.array([1.0, float("nan"), 1.0], pa.float32())),  # NaN label
        _inter(click=pa.array(["x", "y", "z"])),  # non-numeric task
        _inter(click=None),  # no task at all
    ],
)
def test_bad_interactions_raise_data_error(tmp_path, cols):
    with pytest.raises(DataError):
        read_interactions(_write(tmp_path, "i.parquet", cols))


def test_empty_missing_and_foreign_files_raise_data_error(tmp_path):
    empty = _write(tmp_path, "e.parquet", {"user_id": pa.array([], pa.int64()), "item_id": pa.array([], pa.int64())})
    with pytest.raises(DataError):
        read_interactions(empty)
    with pytest.raises(DataError):
        read_interactions(tmp_path / "nope.parquet")
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(SterlingError):
        read_interactions(junk)


def test_feature_columns_are_classified_and_validated(tmp_path):
    items = read_features(
        _write(
            tmp_path,
            "items.parquet",
            {
                "item_id": pa.array([10, 11], pa.int64()),
                "genre": pa.array([["a", "b"], None], pa.list_(pa.string())),
                "year": pa.array([1990, None], pa.int64()),
                "emb": pa.array([[0.1, 0.2], [0.3, 0.4]], pa.list_(pa.float32())),
                "attributes": pa.array([["lang:en"], []], pa.list_(pa.string())),
            },
        ),
        "item_id",
    )
    vals, offs = items.sparse["genre"]
    assert vals.tolist() == ["a", "b"] and offs.tolist() == [0, 2, 2]
    assert items.sparse["year"][1].tolist() == [0, 1, 1]  # a null scalar is an empty bag
    assert items.dense["emb"].shape == (2, 2)
    assert items.attributes == [["lang:en"], []]
    bad = [
        {"item_id": pa.array([1, 1], pa.int64())},  # duplicate id
        {"item_id": pa.array([1, 2], pa.int64()), "x": pa.array([True, False])},  # unsupported type
        {"item_id": pa.array([1, 2], pa.int64()), "e": pa.array([[1.0], [1.0, 2.0]], pa.list_(pa.float32()))},
        {"item_id": pa.array([1, 2], pa.int64()), "f": pa.array([1.0, float("inf")], pa.float32())},
        {"item_id": pa.array([1, 2], pa.int64()), "attributes": pa.array([["nocolon"], []], pa.list_(pa.string()))},
    ]
    for i, cols in enumerate(bad):
        with pytest.raises(DataError):
            read_features(_write(tmp_path, f"bad{i}.parquet", cols), "item_id")


def test_interactions_referencing_unknown_items_raise(tmp_path):
    inter = read_interactions(_write(tmp_path, "i.parquet", _inter()))
    items = read_features(_write(tmp_path, "t.parquet", {"item_id": pa.array([10], pa.int64())}), "item_id")
    with pytest.raises(DataError):
        check_references(inter, users=None, items=items)


def test_vocab_maps_known_values_and_hashes_unknown_ones_stably():
    v = Vocab.build(np.array(["b", "a", "b", "c", "b", "a"], dtype=object), max_size=2, oov_buckets=3)
    assert v.values == ["b", "a"]  # by frequency
    rows = v.lookup(np.array(["a", "b", "c", "zzz"], dtype=object))
    assert rows[:2].tolist() == [1, 0]
    assert all(2 <= r < v.size for r in rows[2:].tolist())
    assert rows.tolist() == Vocab.from_meta(v.to_meta()).lookup(np.array(["a", "b", "c", "zzz"], dtype=object)).tolist()


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 4), min_size=1, max_size=12),
    picks=st.lists(st.integers(-1, 11), max_size=10),
)
def test_csr_take_equals_python_slicing(lengths, picks):
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = np.arange(offsets[-1], dtype=np.int64) * 7
    rows = np.array([p for p in picks if p < len(lengths)], dtype=np.int64)
    got_v, got_l = csr_take(values, offsets, rows)
    want = [values[offsets[r] : offsets[r + 1]].tolist() if r >= 0 else [] for r in rows.tolist()]
    assert got_l.tolist() == [len(w) for w in want]
    assert got_v.tolist() == [x for w in want for x in w]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 50)), min_size=1, max_size=60), st.sampled_from([0.1, 0.3, 0.5]))
def test_split_by_time_holds_out_each_users_latest_records(records, fraction):
    users = np.array([u for u, _ in records], np.int64)
    ts = np.array([t for _, t in records], np.int64)
    held = split_by_time(users, ts, fraction)
    for u in set(users.tolist()):
        rows = [i for i in range(len(users)) if users[i] == u]
        order = sorted(rows, key=lambda i: (ts[i], i))
        n = len(rows)
        want = 0 if n < 3 else max(1, round(fraction * n))
        assert {i for i in rows if held[i]} == set(order[n - want :])


def test_movielens_100k_converts_from_the_installed_wheel(tmp_path):
    import importlib.util

    if importlib.util.find_spec("recbole") is None:
        pytest.skip("recbole (the MovieLens-100k carrier) is not installed")
    from sterling.model.movielens import write_movielens_100k

    p = write_movielens_100k(tmp_path)
    inter = read_interactions(p["interactions"])
    users, items = read_features(p["users"], "user_id"), read_features(p["items"], "item_id")
    check_references(inter, users=users, items=items)
    assert (len(inter), len(users), len(items)) == (100_000, 943, 1682)
    assert set(inter.tasks) == {"watch", "like"} and 0.4 < inter.tasks["like"].mean() < 0.7
    assert all(t.split(":")[0] in {"genre", "decade"} for a in items.attributes for t in a)


def test_index_path_and_learned_module_import_without_torchrec():
    import subprocess
    import sys

    code = (
        "import sys; import sterling.model as m; m.ItemIndex; m.build_index; m.LearnedRetrievalModel; "
        "import sterling.model.data, sterling.model.value_model, sterling.model.overarch; "
        "assert 'torchrec' not in sys.modules, sorted(k for k in sys.modules if 'torchrec' in k)[:3]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
