"""Bloom signatures: documented hash, sizing to the target rate, layouts, filter errors."""

from __future__ import annotations

import hashlib

import pytest
import torch

from sterling.kernels.bloom_sliced import popcount_words
from sterling.kernels.filter_eval import OP_FALSE
from sterling.model import IndexConfig, build_index
from sterling.model.bloom import (
    BloomSpec,
    bit_slice,
    expected_fpr,
    measure_fpr,
    size_bloom,
    term_positions,
    term_words,
)
from sterling.model.errors import FilterSyntaxError, FilterTooLargeError, InvalidInputError
from sterling.model.filter import UnknownFeatureError, compile_filters
from sterling.model.synthetic import synthetic_catalog


def _documented_positions(term: str, bits: int, k: int) -> list[int]:
    """The hash exactly as model/bloom.py's docstring writes it."""
    out, seed = [], 0
    while len(out) < k:
        d = hashlib.blake2b(
            term.encode("utf-8"), digest_size=8, person=b"sterling.bloom2", salt=seed.to_bytes(8, "little")
        ).digest()
        p = int.from_bytes(d, "little") % bits
        if p not in out:
            out.append(p)
        seed += 1
    return out


@pytest.mark.parametrize("term, bits, k", [("lang:en", 128, 4), ("country:\"United States\"", 192, 7), ("a:b", 64, 16)])
def test_term_positions_follow_the_documented_hash(term, bits, k):
    got = term_positions(term, bits, k)
    assert got == _documented_positions(term, bits, k)
    assert len(set(got)) == k
    w = term_words([term], BloomSpec(words=bits // 64, hashes=k))
    assert int(popcount_words(w)[0]) == k


def test_golden_positions_never_change_silently():
    # artifacts depend on these: changing the hash requires a new scheme name
    assert term_positions("lang:en", 128, 4) == [118, 94, 92, 73]


@pytest.mark.parametrize("terms", [1, 3, 7, 20, 60])
@pytest.mark.parametrize("target", [1e-2, 1e-3, 1e-4])
def test_sizing_lands_within_2x_of_target_in_expectation(terms, target):
    spec = size_bloom(terms, target)
    rate = spec.expected_fpr(terms)
    if terms == 1:
        # one term in 64 bits can only give 1/C(64, k) = 1.6e-2, 4.9e-4, 2.4e-5, …: nearest in log ratio
        assert rate <= 2 * target and spec.words == 1
    else:
        assert target / 2 <= rate <= 2 * target, (spec, rate)
    if spec.words > 1:  # fewest words: one less cannot reach the target with any k
        assert min(expected_fpr(terms, 64 * (spec.words - 1), k) for k in range(1, 17)) > target


@pytest.mark.parametrize("target", [1e-2, 1e-3])
def test_measured_fpr_before_verification_is_within_2x_of_target(target):
    c = synthetic_catalog(30_000, 4, seed=11)
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=4, target_fpr=target, kmeans_iters=2))
    measured = measure_fpr(index, samples=400_000, seed=1)
    assert target / 2 <= measured <= 2 * target, (index.bloom_spec, measured)


def test_histogram_sizing_uses_fewer_bits_than_sizing_for_the_max():
    counts = torch.tensor([4] * 990 + [40] * 10)
    by_hist, by_max = size_bloom(counts, 1e-3), size_bloom(40, 1e-3)
    assert by_hist.bits < by_max.bits
    assert by_hist.expected_fpr(counts) <= 2e-3


def test_size_bloom_rejects_a_bad_target():
    with pytest.raises(InvalidInputError):
        size_bloom(5, 0.0)


def test_bit_slice_transposes_item_major_bits():
    g = torch.Generator().manual_seed(0)
    sig = torch.randint(-(2**62), 2**62, (130, 2), generator=g)
    sl = bit_slice(sig, chunk=64)
    assert sl.shape == (128, 3)
    for i in range(130):
        for b in range(128):
            assert (int(sig[i, b // 64]) >> (b % 64)) & 1 == (int(sl[b, i // 64]) >> (i % 64)) & 1
    assert int(sl[:, 2].bitwise_and(~((1 << 2) - 1)).abs().sum()) == 0  # padding items have no bits


# ---------------------------------------------------------------- errors


def _compile(where, **kw):
    vocab = {"lang:en": 0, "lang:fr": 1, "policy:ok": 2}
    return compile_filters(
        where, 1, vocab_index=vocab, term_words_fn=lambda t: torch.zeros(len(t), 1, dtype=torch.int64), **kw
    )


def test_unknown_feature_is_a_typed_error_in_strict_mode_and_matches_nothing_otherwise():
    with pytest.raises(UnknownFeatureError):
        _compile("lang:en AND colour:red", unknown_features="error")
    # an unknown *value* of a known feature is data, not an error
    _compile("lang:klingon", unknown_features="error")
    f = _compile("colour:red")
    assert f.programs[0] == [(OP_FALSE, 0)] and f.term_vocab.numel() == 0


def test_term_limit_is_configurable_and_typed():
    _compile(" OR ".join(f"lang:v{i}" for i in range(256)))
    with pytest.raises(FilterTooLargeError):
        _compile(" OR ".join(f"lang:v{i}" for i in range(257)))
    with pytest.raises(FilterTooLargeError):
        _compile("lang:en AND lang:fr AND policy:ok", max_terms=2)


@pytest.mark.parametrize("expr", ["lang:en AND", "(lang:en", "NOT", "lang:en OR OR lang:fr", "lang en"])
def test_malformed_expressions_are_syntax_errors(expr):
    with pytest.raises(FilterSyntaxError):
        _compile(expr)


def test_index_search_applies_the_configured_term_limit():
    c = synthetic_catalog(500, 4, seed=2)
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=2, max_filter_terms=3))
    with pytest.raises(FilterTooLargeError):
        index.search(c.embeddings[:1], k=5, where="lang:en OR lang:fr OR lang:de OR lang:es")
