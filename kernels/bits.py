"""Bitmask helpers: one bit per item, little-endian within each byte."""

from __future__ import annotations

import torch

__all__ = ["pack_bits", "unpack_bits_range"]

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [n] → uint8 [ceil(n/8)]; item i is bit (i % 8) of byte i // 8."""
    n = mask.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8)
    padded[:n] = mask.to(torch.uint8)
    return (padded.view(-1, 8) << _SHIFTS).sum(dim=1, dtype=torch.uint8)


def unpack_bits_range(bits: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """uint8 bitmask → bool [end - start] for items start..end-1."""
    if end <= start:
        return torch.zeros(0, dtype=torch.bool)
    lo, hi = start // 8, (end + 7) // 8
    unpacked = (bits[lo:hi, None] >> _SHIFTS.to(bits.device)) & 1  # [hi-lo, 8]
    first = start - lo * 8
    return unpacked.reshape(-1)[first : first + (end - start)].bool()
