"""Bad input gets a typed error naming the value; nothing half-built."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sterling.model import IndexConfig, build_index
from sterling.model.errors import (
    DimensionMismatchError,
    DuplicateIdError,
    EmptyCatalogError,
    FilterSyntaxError,
    InvalidAttributeError,
    InvalidInputError,
    NonFiniteError,
)


def xb(n=64, d=8):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def index():
    return build_index(xb(), attributes=[["lang:en"]] * 64, config=IndexConfig(nlist=4))


def test_wrong_query_dimension(index):
    with pytest.raises(DimensionMismatchError):
        index.search(torch.randn(2, 9), k=3)
    with pytest.raises(DimensionMismatchError):
        index.search(torch.randn(2, 2, 8), k=3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_queries_and_embeddings(index, bad):
    q = torch.randn(3, 8)
    q[1, 2] = bad
    with pytest.raises(NonFiniteError, match="row 1"):
        index.search(q, k=3)
    x = xb()
    x[17, 0] = bad
    with pytest.raises(NonFiniteError, match="17"):
        build_index(x, config=IndexConfig(nlist=4))


def test_duplicate_and_negative_ids():
    ids = np.arange(64)
    ids[10] = 3
    with pytest.raises(DuplicateIdError, match="3"):
        build_index(xb(), ids=ids, config=IndexConfig(nlist=4))
    ids = np.arange(64)
    ids[5] = -7
    with pytest.raises(DuplicateIdError, match="-7"):
        build_index(xb(), ids=ids, config=IndexConfig(nlist=4))
    with pytest.raises(InvalidInputError):
        build_index(xb(), ids=np.arange(10), config=IndexConfig(nlist=4))


def test_empty_catalog():
    with pytest.raises(EmptyCatalogError):
        build_index(torch.zeros(0, 8))


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_k_must_be_a_positive_integer(index, k):
    with pytest.raises(InvalidInputError):
        index.search(torch.randn(1, 8), k=k)


@pytest.mark.parametrize("nprobe", [0, 5, -1])
def test_nprobe_outside_1_to_nlist(index, nprobe):
    with pytest.raises(InvalidInputError, match=str(nprobe)):
        index.search(torch.randn(1, 8), k=3, nprobe=nprobe)


def test_malformed_filter(index):
    with pytest.raises(FilterSyntaxError):
        index.search(torch.randn(1, 8), k=3, where="lang:en AND (")


@pytest.mark.parametrize("attrs", [["lang-en"], [":en"], ["lang:"], ["9lang:x"], "lang:en", [" lang:en"]])
def test_attributes_must_be_feature_colon_value(attrs):
    with pytest.raises(InvalidAttributeError):
        build_index(xb(4), attributes=[["lang:en"], ["lang:en"], attrs, ["lang:en"]], config=IndexConfig(nlist=2))


def test_bad_config_values():
    for kw in [dict(nlist=0), dict(metric="l3"), dict(target_fpr=0), dict(nprobe=9, nlist=4), dict(list_slack=-1)]:
        with pytest.raises(InvalidInputError):
            IndexConfig(**kw)
    with pytest.raises(InvalidInputError, match="nlist"):
        build_index(xb(8), config=IndexConfig(nlist=16))
