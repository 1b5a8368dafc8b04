"""Finite scalar quantisation (FSQ, Mentzer et al. 2023): each of ``len(levels)`` channels is bounded and
rounded to one of ``levels[i]`` values; a code is the mixed-radix number of its channel digits."""

from __future__ import annotations

import torch
from torch import Tensor


class FSQ(torch.nn.Module):
    def __init__(self, levels: list[int], eps: float = 1e-3):
        super().__init__()
        if not levels or any(l < 2 for l in levels):
            raise ValueError(f"FSQ levels must be integers >= 2, got {levels}")
        self.levels = list(levels)
        self.eps = eps
        lv = torch.tensor(levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + levels[:-1], dtype=torch.long), 0)
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        n = 1
        for l in self.levels:
            n *= l
        return n

    def bound(self, z: Tensor) -> Tensor:
        """Squash ``z`` ``[..., dim]`` so that rounding gives exactly ``levels[i]`` values per channel."""
        half = (self._levels - 1) * (1 + self.eps) / 2
        offset = torch.where(self._levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def quantize(self, z: Tensor) -> Tensor:
        """Rounded, normalised codes in [-1, 1] (straight-through gradient)."""
        b = self.bound(z)
        q = b + (torch.round(b) - b).detach()
        return q / (self._levels // 2)

    def codes_to_indices(self, q: Tensor) -> Tensor:
        half = self._levels // 2
        digits = torch.round(q * half + half).long()
        return (digits * self._basis).sum(-1)

    def indices_to_codes(self, idx: Tensor) -> Tensor:
        half = self._levels // 2
        digits = (idx[..., None] // self._basis) % self._levels.long()
        return (digits.float() - half) / half

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        q = self.quantize(z)
        return q, self.codes_to_indices(q)
