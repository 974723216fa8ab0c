"""The filter language: parsing, errors, and exactness against a Python oracle."""

from __future__ import annotations

import random

import pytest
import torch

from sterling.model import IndexConfig, build_index, parse_filter
from sterling.model.errors import FilterSyntaxError, FilterTooLargeError, InvalidInputError
from sterling.model.filter import And, Not, Or, Term
from tests.oracle import exact_topk, holds, item_terms, random_expr, recall, render


def test_precedence_not_binds_tighter_than_and_than_or():
    node = parse_filter("a:1 OR b:2 AND NOT c:3")
    assert node == Or((Term("a", "1"), And((Term("b", "2"), Not(Term("c", "3"))))))


def test_keywords_case_insensitive_and_quoted_values():
    node = parse_filter('country:"United States" and not lang:en')
    assert node == And((Term("country", "United States"), Not(Term("lang", "en"))))


@pytest.mark.parametrize(
    "expr, pos",
    [
        ("lang:en AND", 11),
        ("(lang:en OR country:US", 22),
        ("lang:en)", 7),
        ("lang:en country:US", 8),
        ("AND lang:en", 0),
        ("lang", 0),
        ("lang:en AND :x", 12),
        ('lang:"en', 5),
    ],
)
def test_malformed_expressions_report_the_position(expr, pos):
    with pytest.raises(FilterSyntaxError) as e:
        parse_filter(expr)
    assert e.value.position == pos


def test_too_many_terms_is_a_typed_error():
    expr = " OR ".join(f"f:v{i}" for i in range(257))
    with pytest.raises(FilterTooLargeError):
        parse_filter(expr)
    assert parse_filter(expr, max_terms=300) is not None


def test_empty_expression_matches_everything(small_index, small_catalog):
    xq = small_catalog.embeddings[:5]
    a = small_index.search(xq, k=10, nprobe=4, where="")
    b = small_index.search(xq, k=10, nprobe=4)
    assert torch.equal(a[1], b[1])


def test_unknown_feature_matches_nothing_and_its_negation_everything(small_index, small_catalog):
    xq = small_catalog.embeddings[:5]
    _, ids = small_index.search(xq, k=10, nprobe=4, where="nosuch:x")
    assert bool((ids == -1).all())
    _, a = small_index.search(xq, k=10, nprobe=4, where="NOT nosuch:x")
    _, b = small_index.search(xq, k=10, nprobe=4)
    assert torch.equal(a, b)


def test_per_query_filters_in_one_batch(small_index, small_catalog):
    xq = small_catalog.embeddings[:3]
    wheres = ["lang:en", None, "policy:blocked"]
    _, ids = small_index.search(xq, k=10, nprobe=8, where=wheres)
    for q, w in enumerate(wheres):
        _, solo = small_index.search(xq[q : q + 1], k=10, nprobe=8, where=w)
        assert torch.equal(ids[q], solo[0])
    with pytest.raises(InvalidInputError):
        small_index.search(xq, k=10, where=["lang:en"])


def test_filtered_search_never_returns_ineligible_items_over_200_expressions(small_catalog, small_index):
    rng = random.Random(7)
    terms = item_terms(small_catalog.attributes)
    row_of = {int(i): r for r, i in enumerate(small_catalog.ids.tolist())}
    vocab = small_catalog.attributes.vocab
    exprs = [random_expr(rng, vocab) for _ in range(220)]
    xq = small_catalog.embeddings[torch.randint(0, 20_000, (220,), generator=torch.Generator().manual_seed(1))] + 0.01
    _, ids = small_index.search(xq, k=20, nprobe=small_index.nlist // 4, where=[render(e) for e in exprs])
    found_total = truth_total = 0
    for q, e in enumerate(exprs):
        for i in ids[q].tolist():
            if i >= 0:
                assert holds(e, terms[row_of[i]]), f"{render(e)} returned ineligible id {i}"
        mask = torch.tensor([holds(e, t) for t in terms])
        _, rows = exact_topk(xq[q : q + 1], small_catalog.embeddings, 20, mask)
        truth = torch.where(rows >= 0, small_catalog.ids[rows.clamp(min=0)], -1)
        r = recall(ids[q : q + 1], truth)
        n_truth = int((truth >= 0).sum())
        found_total += r * n_truth
        truth_total += n_truth
    assert truth_total > 1000  # the expressions are not all empty
    assert found_total / truth_total >= 0.95


def test_full_scan_filter_equals_oracle_eligible_set_exactly():
    from sterling.model.synthetic import synthetic_catalog

    c = synthetic_catalog(3000, 8, seed=5)
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=IndexConfig(nlist=8, bloom_bits=64, bloom_hashes=2))
    terms = item_terms(c.attributes)
    rng = random.Random(3)
    for _ in range(30):
        e = random_expr(rng, c.attributes.vocab)
        _, ids = index.search(c.embeddings[:1], k=3000, nprobe=8, where=render(e))
        got = set(ids[0][ids[0] >= 0].tolist())
        want = {int(c.ids[r]) for r, t in enumerate(terms) if holds(e, t)}
        assert got == want, render(e)


def test_approximate_mode_can_leak_false_positives_but_exact_mode_never_does():
    from sterling.model.synthetic import synthetic_catalog

    c = synthetic_catalog(3000, 8, seed=5)
    # a deliberately tiny Bloom (high FPR) makes false positives certain
    cfg = IndexConfig(nlist=8, bloom_bits=64, bloom_hashes=1)
    index = build_index(c.embeddings, ids=c.ids, attributes=c.attributes, config=cfg)
    terms = item_terms(c.attributes)
    row_of = {int(i): r for r, i in enumerate(c.ids.tolist())}
    expr = "lang:ja AND country:JP"
    _, approx = index.search(c.embeddings[:1], k=3000, nprobe=8, where=expr, exact=False)
    _, exact = index.search(c.embeddings[:1], k=3000, nprobe=8, where=expr, exact=True)
    bad = [i for i in approx[0].tolist() if i >= 0 and not {"lang:ja", "country:JP"} <= terms[row_of[i]]]
    assert bad, "expected Bloom false positives with exact=False at FPR 0.5"
    assert all({"lang:ja", "country:JP"} <= terms[row_of[i]] for i in exact[0].tolist() if i >= 0)


@pytest.mark.parametrize(
    "expr",
    ["(" * 3000 + "lang:en" + ")" * 3000, "NOT " * 5000 + "lang:en", "(" * 65 + "lang:en" + ")" * 65,
     "NOT (" * 40 + "lang:en" + ")" * 40],
)
def test_deep_nesting_raises_a_typed_error_naming_the_limit(expr):
    from sterling.model.filter import MAX_DEPTH

    with pytest.raises(FilterTooLargeError, match=str(MAX_DEPTH)):
        parse_filter(expr)


def test_nesting_up_to_the_limit_parses_to_the_same_answer():
    from sterling.model.filter import MAX_DEPTH

    assert parse_filter("(" * MAX_DEPTH + "lang:en" + ")" * MAX_DEPTH) == parse_filter("lang:en")
    node = parse_filter("NOT " * MAX_DEPTH + "lang:en")
    for _ in range(MAX_DEPTH):
        assert isinstance(node, Not)
        node = node.child
    assert node == parse_filter("lang:en")


def test_program_term_limit_is_a_typed_error_at_compile_time():
    from sterling.model.filter import check_program_terms, compile_filters

    vocab = {f"f:{i}": i for i in range(20)}
    f = compile_filters(" OR ".join(f"f:{i}" for i in range(13)), 2, vocab_index=vocab,
                        term_words_fn=lambda t: torch.zeros(len(t), 1, dtype=torch.int64))
    check_program_terms(f, 13, backend="test")
    with pytest.raises(FilterTooLargeError, match="at most 12"):
        check_program_terms(f, 12, backend="test")
