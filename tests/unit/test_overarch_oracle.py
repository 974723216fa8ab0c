"""Every OverArch against a plain oracle of its definition, written here per (user, candidate).

The oracles read the raw item embeddings v (no cache, no folding of user-side
matrices, no serving tricks), so they check the whole chain: ``item_side`` →
cache → ``forward``. Both implementations are checked: the differentiable
path (outputs and the gradients of every parameter and of u, which training
uses) and the no-grad serving path over a wide candidate set with invalid
candidates (and, for attention, a user with none valid).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sterling.model.heads import TaskHeads
from sterling.model.learned import EmbeddingCache
from sterling.model.overarch import OVERARCHES, build_overarch

D = 16
WIDE = 1061  # candidates per user in the serving-path checks (the bench's K0 is 10k)


def _dot_oracle(arch, u, v, valid):
    return torch.stack([torch.stack([(u[b] * v[b, k]).sum().reshape(1) for k in range(v.shape[1])])
                        for b in range(u.shape[0])])


def _mlp_oracle(arch, u, v, valid):
    """relu(W [u, v, u⊙v] + b) → relu(l2(·)), next to u·v; W = [W_u | W_v | W_uvᵀ] as one plain Linear."""
    w1 = torch.cat([arch.w_u.weight, arch.w_v.weight, arch.w_uv.T], dim=1)
    out = []
    for b in range(u.shape[0]):
        rows = []
        for k in range(v.shape[1]):
            z = torch.cat([u[b], v[b, k], u[b] * v[b, k]])
            h1 = torch.relu(w1 @ z + arch.w_u.bias)
            h2 = torch.relu(arch.l2.weight @ h1 + arch.l2.bias)
            rows.append(torch.cat([h2, (u[b] * v[b, k]).sum().reshape(1)]))
        out.append(torch.stack(rows))
    return torch.stack(out)


def _mol_oracle(arch, u, v, valid):
    """φ = Σ_pq g_pq ⟨f_p(u), g_q(v)⟩, gates softmax(G_u(u) + G_x(v) + W_l logits), and the item bias."""
    c = arch.config
    out = []
    for b in range(u.shape[0]):
        fu = F.normalize(arch.f_u(u[b]).view(c.p_q, c.d), dim=1)
        rows = []
        for k in range(v.shape[1]):
            fx = F.normalize(arch.f_x(v[b, k]).view(c.p_x, c.d), dim=1)
            logits = torch.stack([fx[q] @ fu[p] for q in range(c.p_x) for p in range(c.p_q)])  # (q, p) order
            gx = arch.g_x(v[b, k])
            g = torch.softmax(arch.g_u(u[b]) + gx[:-1] + arch.g_l(logits), dim=0)
            rows.append(torch.cat([g * logits, gx[-1:]]))
        out.append(torch.stack(rows))
    return torch.stack(out)


def _attention_oracle(arch, u, v, valid):
    """m latents (+ the user) attend over the valid candidates' keys; each candidate attends over the m summaries."""
    a = arch.config.a
    out = []
    for b in range(u.shape[0]):
        kvq = arch.item_kvq(v[b]) + arch.user_kvq(u[b])  # [K, 3a]
        k, val, q = kvq[:, :a], kvq[:, a : 2 * a], kvq[:, 2 * a :]
        lat = arch.latent + arch.user_lat(u[b])  # [m, a]
        ok = valid[b]
        if ok.any():
            p = torch.softmax(lat @ k[ok].T / math.sqrt(a), dim=1)  # [m, valid K]
            summary = p @ val[ok]
        else:
            summary = torch.zeros_like(lat)
        rows = []
        for i in range(v.shape[1]):
            back = torch.softmax(summary @ q[i] / math.sqrt(a), dim=0)  # [m]
            h = torch.relu(arch.out(back @ summary + q[i]))
            rows.append(torch.cat([h, (u[b] * v[b, i]).sum().reshape(1)]))
        out.append(torch.stack(rows))
    return torch.stack(out)


ORACLES = {"dot": _dot_oracle, "mlp": _mlp_oracle, "mol": _mol_oracle, "attention": _attention_oracle}


def _arch(kind):
    torch.manual_seed(11)
    opts = {"mol": {"p_q": 3, "p_x": 2, "d": 8}, "attention": {"a": 8, "m": 3}, "mlp": {"hidden": (12, 6)}}
    arch = build_overarch(kind, D, **opts.get(kind, {}))
    with torch.no_grad():  # non-trivial biases and latents everywhere
        for p in arch.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return arch


def test_every_overarch_has_an_oracle():
    assert set(ORACLES) == set(OVERARCHES)


@pytest.mark.parametrize("kind", sorted(ORACLES))
def test_training_path_equals_the_oracle_with_its_gradients(kind):
    arch = _arch(kind)
    u = torch.randn(3, D, requires_grad=True)
    v = torch.randn(3, 6, D)
    valid = torch.ones(3, 6, dtype=torch.bool)
    valid[1, 2] = valid[2, 0] = False
    # through the cache's item side, as training does (train_overarch: item_side(v) then forward)
    got = arch(u, arch.item_side(v.reshape(-1, D)).view(3, 6, -1), valid)
    want = ORACLES[kind](arch, u, v, valid)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(want)
    params = [u, *arch.parameters()]
    g_got = torch.autograd.grad((got * w).sum(), params, allow_unused=True)
    g_want = torch.autograd.grad((want * w).sum(), params, allow_unused=True)
    names = ["u"] + [n for n, _ in arch.named_parameters()]
    for name, a, b in zip(names, g_got, g_want):
        if b is None:
            assert a is None or not a.abs().any(), name
            continue
        assert a is not None, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"grad of {n}: {m}")


@pytest.mark.parametrize("kind", sorted(ORACLES))
def test_serving_path_over_a_wide_candidate_set_equals_the_oracle(kind):
    """No grad (the serving path), a wide candidate set, from the cache's gathered rows."""
    arch = _arch(kind).eval()
    B, K, N = 2, WIDE, 600
    ids = torch.arange(N) * 3 + 1
    v_items = torch.randn(N, D)
    pick = torch.randint(0, N, (B, K))
    cand = ids[pick]
    cand[0, :5] = -1  # padding
    if kind == "attention":
        cand[1] = -1  # a user without a single valid candidate
    with torch.no_grad():
        cache = EmbeddingCache.build(ids, arch.item_side(v_items))
        x, valid = cache.gather(cand)
        u = torch.randn(B, D)
        got = arch(u, x, valid)
        # the oracle over a subset of candidates of each user (it is per candidate, except attention's summaries)
        cols = torch.tensor([0, 3, 7, 100, K - 1]) if kind != "attention" else torch.arange(K)
        want = ORACLES[kind](arch, u, v_items[pick][:, cols], valid[:, cols])
    torch.testing.assert_close(got[:, cols][valid[:, cols]], want[valid[:, cols]], rtol=1e-4, atol=1e-5)
    assert got.shape == (B, K, arch.hidden_dim) and torch.isfinite(got).all()


@pytest.mark.parametrize("kind", sorted(ORACLES))
def test_serving_and_training_paths_agree_on_every_candidate(kind):
    """Invalid candidates included (row 0 of the cache): the two paths are one function."""
    arch = _arch(kind).eval()
    u, v = torch.randn(3, D), torch.randn(3, WIDE, D)
    valid = torch.rand(3, v.shape[1]) > 0.2
    valid[2] = False
    x = arch.item_side(v.reshape(-1, D)).view(3, v.shape[1], -1).detach()
    plain = arch(u, x, valid)  # grad enabled: the differentiable path
    with torch.no_grad():
        served = arch(u, x, valid)
    torch.testing.assert_close(served, plain.detach(), rtol=1e-5, atol=1e-5)


def test_heads_equal_the_plain_formula_with_gradients():
    torch.manual_seed(5)
    heads = TaskHeads(7, ["a", "b", "c"])
    with torch.no_grad():
        heads.proj.weight.normal_()
        heads.proj.bias.normal_()
    h = torch.randn(2, 9, 7, requires_grad=True)
    prior = torch.randn(2, 9)
    got = heads(h, prior)
    want = torch.stack([torch.stack([torch.stack([heads.proj.weight[t] @ h[b, k] + heads.proj.bias[t]
                                                  + prior[b, k] * heads.prior_scale[t] for t in range(3)])
                                     for k in range(9)]) for b in range(2)])
    torch.testing.assert_close(got, want)
    with torch.no_grad():  # the serving formula
        served = heads(h, prior)
        assert served.is_contiguous() and heads(h).is_contiguous()
        torch.testing.assert_close(served, want.detach())
        torch.testing.assert_close(heads(h), (want - prior.unsqueeze(-1) * heads.prior_scale).detach())
    params = [h, *heads.parameters()]
    for a, b in zip(torch.autograd.grad(got.square().sum(), params), torch.autograd.grad(want.square().sum(), params)):
        torch.testing.assert_close(a, b)


def test_mlp_cache_of_the_earlier_layout_is_adapted():
    """Caches written as [v, W_v v] (before W_v was folded into the user's matrix) read back as v."""
    arch = _arch("mlp")
    v = torch.randn(5, D)
    with torch.no_grad():
        old = torch.cat([v, arch.w_v(v)], dim=1)
    assert torch.equal(arch.adapt_cache(old), v)
    assert torch.equal(arch.adapt_cache(v), v)
    from sterling.model.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        arch.adapt_cache(torch.randn(5, D + 1))


@pytest.mark.parametrize("fused", [True, False])
def test_mlp_serving_path_with_and_without_the_fused_add_relu(fused, monkeypatch):
    """Builds without ATen's fused add + ReLU take two passes: the same function."""
    import sterling.model.overarch as oa

    if not fused:
        monkeypatch.setattr(oa, "_ADD_RELU", None)
    arch = _arch("mlp").eval()
    u, v = torch.randn(2, D), torch.randn(2, WIDE, D)
    x = arch.item_side(v.reshape(-1, D)).view(2, v.shape[1], -1).detach()
    plain = arch(u, x)
    with torch.no_grad():
        served = arch(u, x)
    torch.testing.assert_close(served, plain.detach(), rtol=1e-5, atol=1e-5)
    # the u·v column is the difference relu(u·v) − relu(−u·v) the second GEMM takes: exact
    torch.testing.assert_close(served[..., -1], torch.bmm(x, u.unsqueeze(2))[..., 0], rtol=1e-6, atol=1e-6)
