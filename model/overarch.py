"""OverArch: learned scoring of the index's K0 candidates, interchangeable by config.

Every OverArch splits its work in two:

* ``item_side(v)`` — [N, D] item embeddings → [N, C] item-side projections,
  computed once at build time and stored in the embedding cache;
* ``forward(u, x, valid)`` — [B, D] user embeddings and [B, K, C] cached rows
  of the candidates → [B, K, H] hidden features (the heads turn them into
  per-task logits). Per candidate only user-dependent work happens here,
  as batched GEMMs.

``forward`` has two implementations of one function: the plain one (autograd:
training, and what ``torch.compile`` traces) and, when autograd is off, a
serving one (``_serve``) that folds user-side matrices, writes GEMM outputs in
place and fuses bias + ReLU passes. tests/unit/test_overarch_oracle.py checks
both against plain per-candidate oracles of each definition.

Variants: ``dot`` (baseline), ``mlp`` over ``[u, v, u⊙v]``, ``mol`` (Mixture
of Logits, Zhai et al. KDD'23: P_Q × P_X embedding pairs, softmax gates from
user, item and the logits) and ``attention`` (candidate-set self-attention
through m induced points, user as context: linear, not quadratic, in K).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sterling.model.errors import InvalidInputError

__all__ = ["OverArch", "DotArch", "MLPArch", "MoLArch", "AttentionArch", "build_overarch", "OVERARCHES"]


class OverArch(nn.Module):
    """Base: subclasses set ``cache_dim`` (C) and ``hidden_dim`` (H)."""

    cache_dim: int
    hidden_dim: int
    kind: str

    def item_side(self, v: torch.Tensor) -> torch.Tensor:  # [N, D] → [N, C]
        raise NotImplementedError

    def flops_per_candidate(self) -> int:
        """Multiply-adds ×2 of the per-candidate GEMM work (for the sgemm-peak fraction)."""
        raise NotImplementedError

    def adapt_cache(self, data: torch.Tensor) -> torch.Tensor:
        """Cache rows [N, C'] stored by an earlier layout of this OverArch → [N, cache_dim] (artifacts, snapshots)."""
        if data.shape[1] != self.cache_dim:
            raise InvalidInputError(f"cache width {data.shape[1]} ≠ OverArch {self.kind!r} cache_dim {self.cache_dim}")
        return data


class DotArch(OverArch):
    kind = "dot"

    @dataclass(kw_only=True, slots=True)
    class Config:
        dim: int

    def __init__(self, config: DotArch.Config) -> None:
        super().__init__()
        self.config = config
        self.cache_dim, self.hidden_dim = config.dim, 1

    def item_side(self, v):
        return v

    def forward(self, u, x, valid=None):
        # uᵀ [1, D] × xᵀ [D, K] per user: a GEMV that streams x once, written [B, 1, K] = [B, K, 1]
        return torch.bmm(u.unsqueeze(1), x.transpose(1, 2)).transpose(1, 2)

    def flops_per_candidate(self) -> int:
        return 2 * self.config.dim


def _serving(x: torch.Tensor) -> bool:
    """The no-grad serving path: no autograd, eager (inductor traces the plain path and fuses it itself)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def _add_relu_(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x = relu(x + bias)`` in one pass (ATen's fused kernel when it has one)."""
    if _ADD_RELU is not None:
        return _ADD_RELU(x, bias)
    return x.add_(bias).relu_()


_ADD_RELU = getattr(torch.ops.aten, "_add_relu_", None)


class MLPArch(OverArch):
    """h₁ = relu(W_u u + W_v v + W_uv (u⊙v)), output ``[relu(l2(h₁)), u·v]``.

    The v-dependent part of the first layer is linear in v with a per-user matrix,
    W_v v + W_uv (u⊙v) = (W_v + W_uv diag(u)) v, so the cache holds v itself and per
    candidate the first layer is one [D → H1] GEMM over the cached row (no item-side
    projection to add: folding W_v into the user's matrix costs nothing per candidate).
    Caches written before this layout (``[v, W_v v]``) load through ``adapt_cache``.
    """

    kind = "mlp"

    @dataclass(kw_only=True, slots=True)
    class Config:
        dim: int
        hidden: tuple[int, int] = (64, 32)

    def __init__(self, config: MLPArch.Config) -> None:
        super().__init__()
        self.config = config
        D, (H1, H2) = config.dim, config.hidden
        self.w_u = nn.Linear(D, H1)
        self.w_v = nn.Linear(D, H1, bias=False)
        self.w_uv = nn.Parameter(torch.randn(D, H1) / math.sqrt(D))
        self.l2 = nn.Linear(H1, H2)
        self.cache_dim, self.hidden_dim = D, H2 + 1

    def item_side(self, v):
        return v

    def adapt_cache(self, data):
        D, H1 = self.config.dim, self.config.hidden[0]
        if data.shape[1] == D + H1:  # the earlier layout [v, W_v v]: v is its first D columns
            return data[:, :D].contiguous()
        return super().adapt_cache(data)

    def user_matrix(self, u):
        """[B, D] → [B, D, H1]: W_vᵀ + diag(u) W_uv, the first layer's map of the candidate v."""
        return self.w_v.weight.T.unsqueeze(0) + u.unsqueeze(2) * self.w_uv.unsqueeze(0)

    def forward(self, u, x, valid=None):
        if _serving(x):
            return self._serve(u, x)
        h1 = torch.relu(torch.baddbmm(self.w_u(u).unsqueeze(1), x, self.user_matrix(u)))
        dot = torch.bmm(x, u.unsqueeze(2))
        return torch.cat([torch.relu(self.l2(h1)), dot], dim=2)

    def _serve(self, u, x):
        """The same function without autograd: two GEMMs over all B·K candidates, each followed by one
        fused bias + ReLU pass, no concatenation.

        The u·v column rides through both layers: the first layer's per-user map gets two more
        columns, u and −u, so after its ReLU the row holds relu(u·v) and relu(−u·v), and the second
        layer's matrix gets one more output column that takes their difference (exactly u·v: the
        other terms are exact zeros). The second layer is then one [B·K, H1 + 2] × [H1 + 2, H2 + 1]
        GEMM that writes the output whole.
        """
        H1, H2 = self.config.hidden
        B, K, _ = x.shape
        w1 = torch.cat([self.user_matrix(u), u.unsqueeze(2), -u.unsqueeze(2)], dim=2)  # [B, D, H1 + 2]
        b1 = torch.cat([self.w_u(u), u.new_zeros(B, 2)], dim=1).unsqueeze(1)  # [B, 1, H1 + 2]
        w2 = x.new_zeros(H1 + 2, H2 + 1)  # [l2ᵀ, 0; 0, 1; 0, −1]
        w2[:H1, :H2] = self.l2.weight.T
        w2[H1, H2], w2[H1 + 1, H2] = 1.0, -1.0
        h = _add_relu_(torch.bmm(x, w1), b1)
        out = torch.mm(h.view(B * K, H1 + 2), w2).view(B, K, H2 + 1)
        _add_relu_(out[..., :H2], self.l2.bias)
        return out

    def flops_per_candidate(self) -> int:
        D, (H1, H2) = self.config.dim, self.config.hidden
        return 2 * (D * H1 + H1 * H2 + D)


class MoLArch(OverArch):
    """Mixture of Logits: φ(u,x) = Σ_pq g_pq(u,x) ⟨f_p(u), g_q(x)⟩ with softmax gates.

    Gates are ``softmax(G_u(u) + G_x(x) + W·logits)``: the item part is
    cached, so per candidate only the P·Q logits and a (PQ × PQ) mix are
    computed. ``hidden`` = gated logits [B, K, P·Q] and a cached item bias
    (popularity the logQ-corrected towers leave out); the heads weigh them
    per task.
    """

    kind = "mol"

    @dataclass(kw_only=True, slots=True)
    class Config:
        dim: int
        p_q: int = 4
        p_x: int = 4
        d: int = 32

    def __init__(self, config: MoLArch.Config) -> None:
        super().__init__()
        self.config = config
        D, P, Q, d = config.dim, config.p_q, config.p_x, config.d
        self.f_u = nn.Linear(D, P * d)
        self.f_x = nn.Linear(D, Q * d)
        self.g_u = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, P * Q))
        self.g_x = nn.Sequential(nn.Linear(D, 64), nn.ReLU(), nn.Linear(64, P * Q + 1))  # gates + item bias
        self.g_l = nn.Linear(P * Q, P * Q, bias=False)
        self.cache_dim, self.hidden_dim = Q * d + P * Q + 1, P * Q + 1

    def item_side(self, v):
        Q, d = self.config.p_x, self.config.d
        fx = F.normalize(self.f_x(v).view(-1, Q, d), dim=2).reshape(-1, Q * d)
        return torch.cat([fx, self.g_x(v)], dim=1)

    def logit_matrix(self, u):
        """[B, D] → [B, Q·d, Q·P] M_u with M_u[(q,d),(r,p)] = δ_qr f_u(u)[p,d]: x[:Qd] @ M_u are the P·Q logits."""
        B = u.shape[0]
        P, Q, d = self.config.p_q, self.config.p_x, self.config.d
        fu = F.normalize(self.f_u(u).view(B, P, d), dim=2)  # [B, P, d]
        return torch.einsum("qr,bpd->bqdrp", torch.eye(Q, dtype=fu.dtype), fu).reshape(B, Q * d, Q * P)

    def forward(self, u, x, valid=None):
        if _serving(x):
            return self._serve(u, x)
        P, Q, d = self.config.p_q, self.config.p_x, self.config.d
        # logits[b,k,(q,p)] = ⟨fx[b,k,q], fu[b,p]⟩ = x[b,k,:Qd] @ M_u; the gate's logit mix g_l(logits)
        # = x @ (M_u W_lᵀ) rides in the same GEMM: one [K, Qd] × [Qd, 2QP] per user
        m = self.logit_matrix(u)
        y = torch.bmm(x[..., : Q * d], torch.cat([m, m @ self.g_l.weight.T], dim=2))  # [B, K, 2QP]
        logits, mix = y[..., : Q * P], y[..., Q * P :]
        gx = x[..., Q * d :]
        gates = torch.softmax(gx[..., :-1] + self.g_u(u).unsqueeze(1) + mix, dim=2)
        return torch.cat([gates * logits, gx[..., -1:]], dim=2)

    def _serve(self, u, x):
        """The same function without autograd: the logits are written straight into the output, the
        gate input is one GEMM over them that accumulates onto the cached item gates (g_l(logits) +
        G_x(x)), and the gating multiplies the output in place: the [K, 2QP] intermediate and the
        concatenation of the plain path are gone."""
        B, K, _ = x.shape
        PQ, Qd = self.config.p_q * self.config.p_x, self.config.p_x * self.config.d
        gx = x[..., Qd:]
        out = x.new_empty(B, K, PQ + 1)
        logits = torch.bmm(x[..., :Qd], self.logit_matrix(u), out=out[..., :PQ])
        z = torch.baddbmm(gx[..., :PQ], logits, self.g_l.weight.T.expand(B, PQ, PQ))
        logits.mul_(torch.softmax(z.add_(self.g_u(u).unsqueeze(1)), dim=2))
        out[..., PQ] = gx[..., PQ]
        return out

    def flops_per_candidate(self) -> int:
        P, Q, d = self.config.p_q, self.config.p_x, self.config.d
        return 2 * (P * Q * d + (P * Q) ** 2 + P * Q)


class AttentionArch(OverArch):
    """Self-attention over the candidate set with the user as context, through ``m`` induced points.

    m user-conditioned latent queries attend over all K candidates (a summary
    of the set), then every candidate attends over the m summaries:
    O(K·m·a), so K0 = 100k stays affordable. Item-side key/value/query
    projections are cached.
    """

    kind = "attention"

    @dataclass(kw_only=True, slots=True)
    class Config:
        dim: int
        a: int = 32
        m: int = 8

    def __init__(self, config: AttentionArch.Config) -> None:
        super().__init__()
        self.config = config
        D, a, m = config.dim, config.a, config.m
        self.item_kvq = nn.Linear(D, 3 * a)
        self.user_kvq = nn.Linear(D, 3 * a)
        self.latent = nn.Parameter(torch.randn(m, a) / math.sqrt(a))
        self.user_lat = nn.Linear(D, a)
        self.out = nn.Linear(a, a)
        self.cache_dim, self.hidden_dim = D + 3 * a, a + 1

    def item_side(self, v):
        return torch.cat([v, self.item_kvq(v)], dim=1)

    def forward(self, u, x, valid=None):
        if _serving(x):
            return self._serve(u, x, valid)
        D, a = self.config.dim, self.config.a
        xv = x[..., :D]
        kvq = x[..., D:] + self.user_kvq(u).unsqueeze(1)  # [B, K, 3a]
        k, v, q = kvq[..., :a], kvq[..., a : 2 * a], kvq[..., 2 * a :]
        lat = self.latent.unsqueeze(0) + self.user_lat(u).unsqueeze(1)  # [B, m, a]
        att = torch.bmm(lat, k.transpose(1, 2)) / math.sqrt(a)  # [B, m, K]
        if valid is not None:
            att = att.masked_fill(~valid.unsqueeze(1), float("-inf"))
        summary = torch.bmm(torch.softmax(att, dim=2).nan_to_num(0.0), v)  # [B, m, a]
        back = torch.softmax(torch.bmm(q, summary.transpose(1, 2)) / math.sqrt(a), dim=2)  # [B, K, m]
        h = torch.relu(self.out(torch.bmm(back, summary) + q))
        return torch.cat([h, torch.bmm(xv, u.unsqueeze(2))], dim=2)

    def _serve(self, u, x, valid=None):
        """The same function without autograd, every step one batched GEMM over the cached columns
        (no [B, K, 3a] sum with the user's projections, no concatenation):

        * the user's key bias adds latent·u_k to every score of a latent: the softmax over the
          candidates ignores it;
        * softmax weights sum to one, so the summaries are P·x_v + u_v (0 for a user without a valid
          candidate, as the masked softmax gives);
        * the candidates' scores over the m summaries are computed as [B, m, K] and normalised over m
          there (a softmax along a contiguous dim of K, not along a last dim of m = 8, which ATen does
          slowly);
        * out(back·S + q) = back·(S W_oᵀ) + x_q W_oᵀ + out(u_q): both GEMMs write into the output.
        """
        D, a = self.config.dim, self.config.a
        B, K, _ = x.shape
        r = 1.0 / math.sqrt(a)
        xv, xk, xw, xq = x[..., :D], x[..., D : D + a], x[..., D + a : D + 2 * a], x[..., D + 2 * a :]
        _, uw, uq = self.user_kvq(u).split(a, dim=1)
        lat = (self.latent.unsqueeze(0) + self.user_lat(u).unsqueeze(1)) * r  # [B, m, a]
        att = torch.bmm(lat, xk.transpose(1, 2))  # [B, m, K]
        some = 1.0
        if valid is not None and not bool(valid.all()):
            att.masked_fill_(~valid.unsqueeze(1), float("-inf"))
            some = valid.any(dim=1).to(x.dtype).view(B, 1, 1)
        p = torch.softmax(att, dim=2)
        if not isinstance(some, float):
            p.nan_to_num_(0.0)
        summary = torch.baddbmm(uw.unsqueeze(1) * some, p, xw)  # [B, m, a]
        sr = summary * r
        back = torch.softmax(torch.baddbmm(torch.bmm(sr, uq.unsqueeze(2)), sr, xq.transpose(1, 2)), dim=1)  # [B, m, K]
        out = x.new_empty(B, K, a + 1)
        h = torch.bmm(xq, self.out.weight.T.expand(B, a, a), out=out[..., :a])
        h.baddbmm_(back.transpose(1, 2), summary @ self.out.weight.T)
        _add_relu_(h, self.out(uq).unsqueeze(1))
        torch.bmm(xv, u.unsqueeze(2), out=out[..., a:])
        return out

    def flops_per_candidate(self) -> int:
        # four m × a products per candidate (its key against the m latents, its value's share of the
        # m summaries, its query against them, its mix of them), the output layer (a × a) and u·v
        a, m, D = self.config.a, self.config.m, self.config.dim
        return 2 * (4 * m * a + a * a + D)


OVERARCHES: dict[str, type[OverArch]] = {c.kind: c for c in (DotArch, MLPArch, MoLArch, AttentionArch)}


def build_overarch(kind: str, dim: int, **options) -> OverArch:
    """``kind`` ∈ dot, mlp, mol, attention; ``options`` go to that class's Config."""
    if kind not in OVERARCHES:
        raise InvalidInputError(f"OverArch {kind!r} is not known; use one of {sorted(OVERARCHES)}")
    cls = OVERARCHES[kind]
    try:
        cfg = cls.Config(dim=dim, **options)
    except TypeError as e:
        raise InvalidInputError(f"bad options {options} for OverArch {kind!r}: {e}") from e
    return cls(cfg)


def overarch_meta(arch: OverArch) -> dict:
    return {"kind": arch.kind, "config": asdict(arch.config)}


def overarch_from_meta(meta: dict) -> OverArch:
    cfg = dict(meta["config"])
    dim = cfg.pop("dim")
    if "hidden" in cfg:
        cfg["hidden"] = tuple(cfg["hidden"])
    return build_overarch(meta["kind"], dim, **cfg)
