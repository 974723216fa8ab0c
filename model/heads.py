"""Multi-task heads: one logit per task column for every candidate."""

from __future__ import annotations

import torch
from torch import nn

from sterling.model.errors import InvalidInputError

__all__ = ["TaskHeads"]


class TaskHeads(nn.Module):
    """[B, K, H] OverArch features (+ [B, K] retrieval score) → [B, K, T] per-task logits.

    ``logit_t = w_t · h + a_t · prior``: the index's own score is a learned
    per-task residual (``a_t`` starts at ``prior_scale``, the two-tower
    softmax temperature's inverse) and ``w_t`` starts near zero, so an
    untrained OverArch ranks exactly like the index and training only adds.
    ``tasks`` fixes the output order.

    Example:
        >>> heads = TaskHeads(16, ["click", "like"])
        >>> logits = heads(torch.randn(2, 100, 16))  # [2, 100, 2]
    """

    def __init__(self, hidden_dim: int, tasks: list[str], prior_scale: float = 20.0) -> None:
        super().__init__()
        if not tasks or len(set(tasks)) != len(tasks):
            raise InvalidInputError(f"tasks must be a non-empty list of distinct names, got {tasks}")
        self.tasks = list(tasks)
        self.proj = nn.Linear(hidden_dim, len(tasks))
        self.prior_scale = nn.Parameter(torch.full((len(tasks),), float(prior_scale)))
        with torch.no_grad():
            self.proj.weight.normal_(0.0, 1e-3)
            self.proj.bias.zero_()

    def forward(self, h: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled():  # training: the plain formula
            out = self.proj(h)
            return out if prior is None else out + prior.unsqueeze(-1) * self.prior_scale
        # serving, the same function: [T, n] = W hᵀ is one streaming pass over h (as [n, H] × [H, T]
        # the GEMM's N = T is so narrow that MKL runs it about 2× slower), read back transposed
        lead, H = h.shape[:-1], h.shape[-1]
        logits = torch.mm(self.proj.weight, h.reshape(-1, H).T).T.reshape(*lead, -1)
        if prior is None:
            return (logits + self.proj.bias).contiguous()
        return torch.addcmul(self.proj.bias, prior.unsqueeze(-1), self.prior_scale) + logits
