"""Comparing a merged top-k with the single-process model's.

Unfiltered batches must be bit-identical. With filters, a shard rescans the
queries whose verified survivors fell short of k, and a GEMM over a
different number of query rows may round the last bit differently (the
single process rescans a different subset of rows). So: padding identical,
scores equal within ``atol``, and ids equal except inside groups of
near-equal scores (which may swap). Both checks can fail.
"""

from __future__ import annotations

import numpy as np

__all__ = ["assert_same_topk"]


def assert_same_topk(ids, scores, ref_ids, ref_scores, *, atol: float = 1e-6, exact: bool = False) -> None:
    ids, scores = np.asarray(ids), np.asarray(scores)
    ref_ids, ref_scores = np.asarray(ref_ids), np.asarray(ref_scores)
    assert ids.shape == ref_ids.shape, (ids.shape, ref_ids.shape)
    if exact:
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_array_equal(scores, ref_scores)
        return
    np.testing.assert_array_equal(ids < 0, ref_ids < 0, err_msg="different numbers of results")
    valid = ref_ids >= 0
    np.testing.assert_allclose(scores[valid], ref_scores[valid], rtol=0, atol=atol)
    assert np.isneginf(scores[~valid]).all()
    for q in np.nonzero((ids != ref_ids).any(1))[0]:
        n = int(valid[q].sum())
        row, ref_row = ids[q, :n], ref_ids[q, :n]
        assert len(set(row.tolist())) == n, f"query {q}: duplicate ids"
        for j in np.nonzero(row != ref_row)[0]:
            # a swap is allowed only among near-equal scores
            same = np.abs(ref_scores[q, :n] - ref_scores[q, j]) <= atol
            near = set(ref_row[same].tolist())
            boundary = abs(float(ref_scores[q, j]) - float(ref_scores[q, n - 1])) <= atol
            assert row[j] in near or boundary, (
                f"query {q} rank {j}: id {row[j]} (score {scores[q, j]}) vs {ref_row[j]} ({ref_scores[q, j]})"
            )
