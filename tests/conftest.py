"""Shared fixtures: small deterministic catalogs and brute-force oracles."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
if not torch.cuda.is_available():
    # Without a GPU, Triton kernels can only run interpreted; this must be set before any
    # module decorates them (test collection may import sterling.kernels.triton_ivf early).
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def small_catalog():
    from sterling.model.synthetic import synthetic_catalog

    return synthetic_catalog(20_000, 32, seed=3)


@pytest.fixture(scope="session")
def small_index(small_catalog):
    from sterling.model import IndexConfig, build_index

    c = small_catalog
    return build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=64))
