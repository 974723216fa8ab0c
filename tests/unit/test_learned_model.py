"""The learned model: TorchRec towers, OverArch caching, Value Model, one-artifact round trip, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("torchrec")

from sterling.model.learned import EmbeddingCache, LearnedRetrievalModel  # noqa: E402
from sterling.model.overarch import OVERARCHES, build_overarch  # noqa: E402
from sterling.model.towers import SparseFeature, Tower, make_kjt  # noqa: E402
from sterling.model.value_model import (  # noqa: E402
    FormulaError,
    FormulaSyntaxError,
    UnknownTaskError,
    ValueModel,
)


def test_tower_kjt_pooling_matches_torchrec_ebc_and_a_plain_oracle():
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

    torch.manual_seed(0)
    feats = (SparseFeature(name="item_id", num_embeddings=50, dim=8), SparseFeature(name="items", num_embeddings=7, dim=4))
    tower = Tower(Tower.Config(sparse=feats, output_dim=16))
    ref = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name=f"ref_{f.name}", embedding_dim=f.dim, num_embeddings=f.num_embeddings,
                                   feature_names=[f.name], pooling=PoolingType.MEAN) for f in feats],
        device=torch.device("cpu"),
    )
    with torch.no_grad():
        for f in feats:
            ref.embedding_bags[f"ref_{f.name}"].weight.copy_(tower.ebc.embedding_bags[f"t_{f.name}"].weight)
    values = [np.array([3, 9, 9, 41, 0]), np.array([6, 2, 5])]
    lengths = [np.array([2, 0, 3]), np.array([1, 2, 0])]
    kjt = make_kjt(["item_id", "items"], values, lengths)
    got = tower.pooled(kjt)
    assert torch.equal(got, ref(kjt).values())
    # independent oracle: mean of the rows of each bag, empty bag = 0
    want = []
    for b in range(3):
        row = []
        for f, v, ln in zip(feats, values, lengths):
            w = tower.ebc.embedding_bags[f"t_{f.name}"].weight
            start = int(ln[:b].sum())
            ids = v[start : start + ln[b]]
            row.append(w[torch.from_numpy(ids)].mean(0) if len(ids) else torch.zeros(f.dim))
        want.append(torch.cat(row))
    torch.testing.assert_close(got, torch.stack(want).detach())


def _naive_mol(arch, u, v):
    """Per (user, candidate) pair, straight from the MoL definition."""
    c = arch.config
    out = torch.empty(u.shape[0], v.shape[1], c.p_x * c.p_q + 1)
    for b in range(u.shape[0]):
        fu = torch.nn.functional.normalize(arch.f_u(u[b]).view(c.p_q, c.d), dim=1)
        for k in range(v.shape[1]):
            fx = torch.nn.functional.normalize(arch.f_x(v[b, k]).view(c.p_x, c.d), dim=1)
            logits = (fx @ fu.T).reshape(-1)  # (q, p) order
            gx = arch.g_x(v[b, k])
            g = torch.softmax(arch.g_u(u[b]) + gx[:-1] + arch.g_l(logits), dim=0)
            out[b, k] = torch.cat([g * logits, gx[-1:]])
    return out


def test_mol_with_cached_item_side_equals_the_definition():
    torch.manual_seed(1)
    arch = build_overarch("mol", 16, p_q=2, p_x=3, d=8)
    u, v = torch.randn(2, 16), torch.randn(2, 5, 16)
    with torch.no_grad():
        x = arch.item_side(v.reshape(-1, 16)).view(2, 5, -1)
        torch.testing.assert_close(arch(u, x), _naive_mol(arch, u, v), rtol=1e-4, atol=1e-5)


def test_mlp_arch_equals_an_mlp_over_u_v_and_their_product():
    torch.manual_seed(2)
    arch = build_overarch("mlp", 8, hidden=(6, 4))
    u, v = torch.randn(3, 8), torch.randn(3, 4, 8)
    with torch.no_grad():
        x = arch.item_side(v.reshape(-1, 8)).view(3, 4, -1)
        got = arch(u, x)
        w1 = torch.cat([arch.w_u.weight, arch.w_v.weight, arch.w_uv.T], dim=1)  # [H1, 3D]
        z = torch.cat([u[:, None].expand(-1, 4, -1), v, u[:, None] * v], dim=2)
        h1 = torch.relu(z @ w1.T + arch.w_u.bias)
        want = torch.cat([torch.relu(arch.l2(h1)), (u[:, None] * v).sum(2, keepdim=True)], dim=2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(OVERARCHES))
def test_serving_path_equals_the_training_path_over_wide_candidate_sets(kind):
    """No-grad calls take the serving path (in-place GEMMs, fused passes): the same function as the
    differentiable one."""
    torch.manual_seed(4)
    arch = build_overarch(kind, 16)
    u, v = torch.randn(3, 16), torch.randn(3, 2085, 16)
    x = arch.item_side(v.reshape(-1, 16)).view(3, v.shape[1], -1).detach()
    want = arch(u, x)  # grad enabled: the plain path
    with torch.no_grad():
        got = arch(u, x)
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(OVERARCHES))
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_cache_gather_feeds_each_overarch_like_the_item_side(kind, dtype):
    torch.manual_seed(3)
    arch = build_overarch(kind, 16)
    N = 40
    ids = torch.randperm(1000)[:N] + 5
    v = torch.nn.functional.normalize(torch.randn(N, 16), dim=1)
    with torch.no_grad():
        cache = EmbeddingCache.build(ids, arch.item_side(v), dtype)
        pick = torch.randint(0, N, (2, 7))
        cand = ids[pick]
        cand[0, 0] = -1  # padding from the index
        x, valid = cache.gather(cand)
        assert valid.tolist()[0][0] is False and bool(valid.flatten()[1:].all())
        want = arch.item_side(v[pick.reshape(-1)]).view(2, 7, -1)
        tol = {"fp32": 0.0, "bf16": 1e-2, "int8": 2e-2}[dtype]
        err = (x - want)[valid].abs().max() / want.abs().max()
        assert err <= tol
        assert arch(torch.randn(2, 16), x, valid).shape == (2, 7, arch.hidden_dim)


# ------------------------------------------------------------------ value model
# formulas generated together with an independent plain-Python evaluator: (text, env → float)
def _div(a, b):
    return 0.0 if b == 0 else a / b  # the documented result of division by zero


_atom = st.one_of(
    st.sampled_from(["click", "like"]).map(lambda n: (n, lambda env, n=n: env[n])),
    st.sampled_from([0.0, 1.0, 2.5, 0.5]).map(lambda c: (repr(c), lambda env, c=c: c)),
)
_OPS = {
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "*": lambda a, b: a * b,
    "/": _div,
}


def _combine(children):
    def binop(t):
        (ta, fa), op, (tb, fb) = t
        return f"({ta} {op} {tb})", lambda env: _OPS[op](fa(env), fb(env))

    def call(t):
        name, (ta, fa), (tb, fb) = t
        f = min if name == "min" else max
        return f"{name}({ta}, {tb})", lambda env: f(fa(env), fb(env))

    return st.one_of(
        st.tuples(children, st.sampled_from(sorted(_OPS)), children).map(binop),
        st.tuples(st.sampled_from(["min", "max"]), children, children).map(call),
    )


@settings(max_examples=80, deadline=None)
@given(st.recursive(_atom, _combine, max_leaves=8), st.floats(0, 1, width=32), st.floats(0, 1, width=32))
def test_value_formula_matches_python_arithmetic(formula, click, like):
    text, oracle = formula
    vm = ValueModel(["click", "like"])
    got = float(vm(torch.tensor([[[click, like]]]), text)[0, 0])
    want = oracle({"click": click, "like": like})
    assert math.isclose(got, want, rel_tol=1e-4, abs_tol=1e-4) or abs(want) > 1e6


def test_value_formula_functions_comparisons_and_errors():
    vm = ValueModel(["click", "like"])
    s = torch.tensor([[[0.2, 0.9], [0.0, 0.5]]])
    torch.testing.assert_close(vm(s, "pow(like, 2) + (click > 0.1) + log(click) * 0 + exp(0)"),
                               torch.tensor([[0.81 + 1 + 1, 0.25 + 0 + 1]]))
    assert torch.isfinite(vm(s, "log(click)")).all() and torch.isfinite(vm(s, "exp(like * 1000)")).all()
    assert vm(s).tolist() == s[..., 0].tolist()  # default: the first task
    for bad, err in [("click +", FormulaSyntaxError), ("views", UnknownTaskError), ("pow(click)", FormulaSyntaxError),
                     ("click ** 2", FormulaSyntaxError), ("eval(click)", FormulaSyntaxError), ("1 2", FormulaSyntaxError),
                     ("__import__('os')", FormulaError), ("click" + " + click" * 600, FormulaError)]:
        with pytest.raises(err):
            vm(s, bad)


# ------------------------------------------------------------------ full model
def test_full_forward_reranks_the_index_candidates_exactly(tiny_model):
    model, _ = tiny_model
    users = model.users.ids[:5]
    out = model(user_ids=users, k=10, k0=50, value_formula="click + like")
    assert out.ids.shape == (5, 10) and out.task_scores.shape == (5, 10, len(model.tasks))
    # oracle: score every ANN candidate one user at a time and sort by value
    for b in range(5):
        u = model.user_embedding(user_ids=users[b : b + 1])
        logits, valid = model.rerank_logits(u, out.ann_ids[b : b + 1], out.ann_scores[b : b + 1])
        p = torch.sigmoid(logits)[0]
        val = p[:, 0] + p[:, 1]
        order = torch.argsort(val, descending=True, stable=True)[:10]
        assert set(out.ids[b].tolist()) == set(out.ann_ids[b, order].tolist())
        torch.testing.assert_close(out.values[b], val[order], rtol=1e-5, atol=1e-6)


def test_filters_hold_through_the_full_model(tiny_model):
    model, data = tiny_model
    out = model(user_ids=model.users.ids[:8], k=20, k0=100, where="lang:en")
    terms = {int(i): set(a) for i, a in zip(data.item_ids.tolist(), data.items.attributes)}
    got = out.ids[out.ids >= 0].tolist()
    assert got and all("lang:en" in terms[i] for i in got)


def test_bare_query_embedding_still_works(tiny_model):
    model, _ = tiny_model
    q = model.user_embedding(user_ids=model.users.ids[:3])
    a = model(q, k=5, k0=30)
    b = model(user_ids=model.users.ids[:3], k=5, k0=30)
    assert torch.equal(a.ids, b.ids)


def test_one_artifact_round_trips_bit_identically(tiny_model, tmp_path):
    model, _ = tiny_model
    path = tmp_path / "m.st"
    model.save(path)
    again = LearnedRetrievalModel.load(path)
    users = model.users.ids[:16]
    a = model(user_ids=users, k=10, k0=60, value_formula="like - click / 2")
    b = again(user_ids=users, k=10, k0=60, value_formula="like - click / 2")
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)
    assert a.version == b.version and torch.equal(a.ann_ids, b.ann_ids)
    assert again.extra_meta["vocabs"] == model.extra_meta["vocabs"]


def test_an_mlp_artifact_with_the_earlier_cache_layout_loads_and_answers_the_same(tiny_model, tmp_path):
    """mlp caches were [v, W_v v]; W_v is now folded into the user's matrix and the cache holds v.
    An artifact written with the old layout loads (the first D columns) and ranks identically."""
    from sterling.model.artifact import write_artifact
    from sterling.model.heads import TaskHeads

    model, _ = tiny_model
    torch.manual_seed(8)
    arch = build_overarch("mlp", model.index.dim)
    v = torch.nn.functional.normalize(torch.randn(model.cache.ids.numel(), model.index.dim), dim=1)  # any item side
    mlp = LearnedRetrievalModel(index=model.index, user_tower=model.user_tower, overarch=arch,
                                heads=TaskHeads(arch.hidden_dim, model.tasks), cache=EmbeddingCache.build(model.cache.ids, v),
                                users=model.users, k0=model.k0).eval()
    tensors, meta = mlp.artifact_parts()
    with torch.no_grad():
        tensors = {**tensors, "cache.data": torch.cat([v, arch.w_v(v)], dim=1)}
    path = tmp_path / "old.st"
    write_artifact(path, kind="learned_retrieval_model", meta=meta, tensors=tensors)
    again = LearnedRetrievalModel.load(path)
    assert torch.equal(again.cache.data, v)
    users = model.users.ids[:6]
    a, b = mlp(user_ids=users, k=10, k0=50), again(user_ids=users, k=10, k0=50)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)


def test_gradients_reach_the_user_tower_and_the_overarch(tiny_model):
    model, data = tiny_model
    model.zero_grad(set_to_none=True)
    users = model.users.ids[:4]
    kjt, dense = model.users.inputs(users)
    u = model.user_tower(kjt, dense)
    scores, cand = model.candidates(u, 30)
    logits, valid = model.rerank_logits(u, cand, scores)
    logits[valid].sum().backward()
    tower_grads = [p.grad for p in model.user_tower.parameters()]
    user_side = [p.grad for n, p in model.overarch.named_parameters() if n.startswith(("f_u", "g_u", "g_l"))]
    assert any(g is not None and g.abs().sum() > 0 for g in tower_grads)
    assert model.user_tower.ebc.embedding_bags["t_history"].weight.grad.abs().sum() > 0
    assert all(g is not None and g.abs().sum() > 0 for g in user_side)
    assert all(p.grad is not None for p in model.heads.parameters())
    model.zero_grad(set_to_none=True)


def test_bad_requests_raise_typed_errors(tiny_model):
    from sterling.model.errors import InvalidInputError

    model, _ = tiny_model
    with pytest.raises(InvalidInputError):
        model(k=5)
    with pytest.raises(InvalidInputError):
        model(user_ids=model.users.ids[:1], k=50, k0=10)
    with pytest.raises(FormulaError):
        model(user_ids=model.users.ids[:1], k=5, value_formula="nope")


def test_rebuilding_from_the_checkpoint_reproduces_the_trained_index(tiny_model, tiny_rec_files):
    from sterling.model.data import read_features

    model, _ = tiny_model
    items = read_features(tiny_rec_files["items"], "item_id")
    again = model.with_catalog(items, index_config=model.index.config)
    assert torch.equal(again.index.codes, model.index.codes) and torch.equal(again.cache.data, model.cache.data)
    users = model.users.ids[:6]
    a, b = model(user_ids=users, k=10, k0=50), again(user_ids=users, k=10, k0=50)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.values, b.values)
    # a smaller catalog: only its items come back
    keep = items.ids[::2]
    sub = items.__class__(ids=keep, sparse={k: _take_rows(v, o, np.arange(0, len(items), 2)) for k, (v, o) in items.sparse.items()},
                          dense={k: v[::2] for k, v in items.dense.items()}, attributes=items.attributes[::2])
    out = model.with_catalog(sub)(user_ids=users, k=10, k0=50)
    assert set(out.ids[out.ids >= 0].tolist()) <= set(keep.tolist())


def _take_rows(values, offsets, rows):
    from sterling.model.data import csr_take

    v, ln = csr_take(values, offsets, rows)
    return v, np.concatenate([[0], np.cumsum(ln)]).astype(np.int64)


_TOKENS = ["click", "like", "views", "(", ")", ",", "+", "-", "*", "/", "<", ">", "==", "min", "max", "pow", "log",
           "exp", "0", "1e308", "-1e-45", "nan", "inf", "2.5.1", "'", "__class__", ".", "**", "\x00", "é", " "]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(st.sampled_from(_TOKENS), max_size=25).map(" ".join)))
def test_random_value_formulas_give_scores_or_a_formula_error(text):
    """Fuzzed formulas (random text and token soup): a [B, N] score tensor or a typed
    ``FormulaError`` (syntax, unknown task, too long); never another exception."""
    vm = ValueModel(["click", "like"])
    s = torch.tensor([[[0.2, 0.9], [0.0, 0.5]]])
    try:
        out = vm(s, text)
    except FormulaError:
        return
    assert out.shape == (1, 2) and out.dtype == torch.float32


def test_serving_reranks_gather_into_a_reused_buffer_without_changing_answers(tiny_model):
    """Without autograd the cache rows go into a pooled buffer (``GatherBuffers``): answers equal the
    training path's (fresh gather, plain OverArch) for two different candidate sets in a row, so a
    reused buffer never leaks one call's rows into the next."""
    from sterling.model import learned as learned_mod

    model, _ = tiny_model
    users = model.users.ids[:4]
    u = model.user_embedding(user_ids=users).detach()
    g = torch.Generator().manual_seed(3)
    ids = model.cache.ids
    for _ in range(2):
        cand = ids[torch.randint(0, ids.numel(), (4, 40), generator=g)]
        cand[0, :5] = -1  # padding rows stay invalid
        with torch.no_grad():
            served, ok = model.rerank_logits(u, cand)
        with torch.enable_grad():
            plain, ok2 = model.rerank_logits(u, cand)
        assert torch.equal(ok, ok2)
        torch.testing.assert_close(served[ok], plain.detach()[ok], rtol=1e-4, atol=1e-5)
    assert learned_mod._GATHER.kept_bytes() >= 4 * 40 * model.cache.data.shape[1] * 4
