"""OverArch: learned scoring of the index's K0 candidates, interchangeable by config.

Every OverArch splits its work in two:

* ``item_side(v)`` — [N, D] item embeddings → [N, C] item-side projections,
  computed once at build time and stored in the embedding cache;
* ``forward(u, x, valid)`` — [B, D] user embeddings and [B, K, C] cached rows
  of the candidates → [B, K, H] hidden features (the heads turn them into
  per-task logits). Per candidate only user-dependent work happens here,
  as batched GEMMs.

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
        return torch.bmm(x, u.unsqueeze(2))  # [B, K, 1]

    def flops_per_candidate(self) -> int:
        return 2 * self.config.dim


_CHUNK = 1024  # candidates per step of the no-grad serving paths (intermediates stay in L2)


class MLPArch(OverArch):
    """h₁ = relu(W_u u + W_v v + W_uv (u⊙v)); the W_v v part is cached, u⊙v·W_uv = v·(diag(u) W_uv)."""

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
        self.cache_dim, self.hidden_dim = D + H1, H2 + 1

    def item_side(self, v):
        return torch.cat([v, self.w_v(v)], dim=1)

    def forward(self, u, x, valid=None):
        if not torch.is_grad_enabled() and x.shape[1] > _CHUNK and not torch.compiler.is_compiling():
            return self._serve(u, x)
        D = self.config.dim
        xv, xp = x[..., :D], x[..., D:]
        m = u.unsqueeze(2) * self.w_uv.unsqueeze(0)  # [B, D, H1]
        h1 = torch.relu(torch.baddbmm(xp + self.w_u(u).unsqueeze(1), xv, m))
        dot = torch.bmm(xv, u.unsqueeze(2))
        return torch.cat([torch.relu(self.l2(h1)), dot], dim=2)

    def _serve(self, u, x):
        """The same function without autograd, for wide candidate sets: ``_CHUNK`` candidates at a
        time so every intermediate stays in cache, the u·v column folded into the first GEMM
        (``[diag(u) W_uv | u]``) and the element-wise steps done in place."""
        D, (H1, H2) = self.config.dim, self.config.hidden
        B, K, _ = x.shape
        m = torch.cat([u.unsqueeze(2) * self.w_uv.unsqueeze(0), u.unsqueeze(2)], dim=2)  # [B, D, H1 + 1]
        wu = torch.cat([self.w_u(u), u.new_zeros(B, 1)], dim=1).unsqueeze(1)  # [B, 1, H1 + 1]
        w2, b2 = self.l2.weight.T, self.l2.bias
        out = x.new_empty(B, K, H2 + 1)
        h = x.new_empty(B, _CHUNK, H1 + 1)
        for s in range(0, K, _CHUNK):
            n = min(_CHUNK, K - s)
            xs, hs, o = x[:, s : s + n], h[:, :n], out[:, s : s + n]
            torch.baddbmm(wu, xs[..., :D], m, out=hs)
            hs[..., :H1].add_(xs[..., D:]).relu_()
            o[..., :H2] = torch.addmm(b2, hs[..., :H1].reshape(B * n, H1), w2).view(B, n, H2).relu_()
            o[..., H2] = hs[..., H1]
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

    def forward(self, u, x, valid=None):
        B, K, _ = x.shape
        P, Q, d = self.config.p_q, self.config.p_x, self.config.d
        fu = F.normalize(self.f_u(u).view(B, P, d), dim=2)  # [B, P, d]
        # logits[b,k,(q,p)] = ⟨fx[b,k,q], fu[b,p]⟩ = x[b,k,:Qd] @ M_u with M_u[(q,d),(r,p)] = δ_qr fu[p,d];
        # the gate's logit mix g_l(logits) = x @ (M_u W_lᵀ) rides in the same GEMM: one [K, Qd] × [Qd, 2QP] per user
        m = torch.einsum("qr,bpd->bqdrp", torch.eye(Q, dtype=fu.dtype), fu).reshape(B, Q * d, Q * P)
        y = torch.bmm(x[..., : Q * d], torch.cat([m, m @ self.g_l.weight.T], dim=2))  # [B, K, 2QP]
        logits, mix = y[..., : Q * P], y[..., Q * P :]
        gx = x[..., Q * d :]
        gates = torch.softmax(gx[..., :-1] + self.g_u(u).unsqueeze(1) + mix, dim=2)
        return torch.cat([gates * logits, gx[..., -1:]], dim=2)

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

    def flops_per_candidate(self) -> int:
        a, m, D = self.config.a, self.config.m, self.config.dim
        return 2 * (3 * m * a + a * a + D)


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
