"""In-place attribute updates: signature and exact CSR stay equal to a fresh build."""

from __future__ import annotations

import random

import pytest
import torch

from sterling.model import IndexConfig, ItemIndex, build_index
from sterling.model.bloom import item_signatures, term_words
from sterling.model.errors import InvalidAttributeError, InvalidInputError
from sterling.model.updates import update_attributes
from tests.oracle import holds, random_expr, render


def _catalog(n=300, seed=0):
    rng = random.Random(seed)
    lists = [sorted({f"f{rng.randrange(3)}:v{rng.randrange(4)}" for _ in range(rng.randint(0, 4))}) for _ in range(n)]
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed))
    ids = torch.arange(n, dtype=torch.int64) + 100
    return x, ids, lists


def _check_against_oracle(index, ids, lists, seed=5):
    terms = {int(i): set(lists[r]) for r, i in enumerate(ids.tolist())}
    vocab = sorted({t for x in lists for t in x} | {"f0:v0"})
    rng = random.Random(seed)
    for _ in range(25):
        e = random_expr(rng, vocab)
        _, got = index.search(torch.randn(1, 4), k=len(lists), nprobe=index.nlist, where=render(e), adaptive=False)
        want = {i for i, t in terms.items() if holds(e, t)}
        assert {int(i) for i in got[0].tolist() if i >= 0} == want, render(e)
    # the stored signature equals one recomputed from the stored exact lists
    words = term_words(index.vocab, index.bloom_spec)
    assert torch.equal(item_signatures(index.attr_ids, index.attr_offsets, words), index.bloom)


@pytest.mark.parametrize("bloom_bits", [64, None])
def test_updates_shrink_grow_empty_and_new_terms_match_the_oracle(bloom_bits):
    x, ids, lists = _catalog()
    index = build_index(x, ids=ids, attributes=lists, config=IndexConfig(nlist=4, bloom_bits=bloom_bits, bloom_hashes=2 if bloom_bits else None))
    v0 = int(index.version)
    rng = random.Random(1)
    picks = rng.sample(range(len(lists)), 40)
    new = []
    for j, r in enumerate(picks):
        kind = j % 4
        if kind == 0:
            t = lists[r][:1]  # shrink (or stay empty)
        elif kind == 1:
            t = [f"f{a}:v{b}" for a in range(3) for b in range(2)]  # grow to 6 terms
        elif kind == 2:
            t = []  # empty
        else:
            t = ["f9:new", f"f0:v{j % 4}", "f9:new"]  # a term the catalog never had (repeated)
        new.append(t)
        lists[r] = sorted(set(t))
    stats = update_attributes(index, ids[picks], new)
    assert stats.items == 40 and stats.grown > 0 and stats.in_place > 0 and stats.new_terms == 1
    assert int(index.version) == v0 + 1
    _check_against_oracle(index, ids, lists)
    # one more round on one item, by scalar id
    update_attributes(index, int(ids[picks[1]]), ["f0:v3"])
    lists[picks[1]] = ["f0:v3"]
    _check_against_oracle(index, ids, lists, seed=9)


def test_a_list_that_fits_is_rewritten_inside_its_slot(tmp_path):
    x, ids, lists = _catalog(50)
    index = build_index(x, ids=ids, attributes=lists, config=IndexConfig(nlist=2))
    r = max(range(50), key=lambda i: len(lists[i]))
    before_ptr, before_off = index.attr_ids.data_ptr(), index.attr_offsets.clone()
    stats = update_attributes(index, [int(ids[r])], [lists[r][:1]])
    assert stats.in_place == 1 and stats.grown == 0
    assert index.attr_ids.data_ptr() == before_ptr and torch.equal(index.attr_offsets, before_off)
    lists[r] = lists[r][:1]
    # survives the artifact round trip
    index.save(tmp_path / "i.st")
    _check_against_oracle(ItemIndex.load(tmp_path / "i.st"), ids, lists)


def test_update_errors_are_typed_and_change_nothing():
    x, ids, lists = _catalog(40)
    index = build_index(x, ids=ids, attributes=lists, config=IndexConfig(nlist=2))
    snapshot = (index.bloom.clone(), index.attr_ids.clone(), list(index.vocab))
    with pytest.raises(InvalidInputError):
        update_attributes(index, [999_999], [["f0:v0"]])
    with pytest.raises(InvalidInputError):
        update_attributes(index, [100, 100], [["f0:v0"], ["f0:v1"]])
    with pytest.raises(InvalidInputError):
        update_attributes(index, [100, 101], [["f0:v0"]])
    with pytest.raises(InvalidAttributeError):
        update_attributes(index, [100, 101], [["f0:v0"], ["no colon"]])
    assert torch.equal(snapshot[0], index.bloom) and torch.equal(snapshot[1], index.attr_ids)
    assert snapshot[2] == index.vocab
