"""``pool``: average-pool each view's patch grid (`visual` stage), the pooling baseline.

Each view (the image, or each AnyRes crop and the base image) is a ``rows x cols`` grid of projected
tokens; it is average-pooled to ``ceil(rows/stride) x ceil(cols/stride)`` (``stride=2``: 2x2 pooling), or,
with a budget, adaptively pooled to ``round(rows*sqrt(keep)) x round(cols*sqrt(keep))`` (``tokens=n``, a
count per image: ``keep = n / (rows*cols*views)``; the rounding of each side makes the count approximate,
e.g. ``tokens=10`` on an 8 x 8 grid keeps 3 x 3). A pooled token takes the place of its window's first token, so the spatial
layout (and AnyRes newlines) is kept. Tokens missing from a view's grid (AnyRes unpadding) are left out of
the windows that would contain them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mmtoken.config import ShortenConfig, param
from mmtoken.plugin import Plugin, register_plugin
from mmtoken.tokens import Selection, VisualTokens


def pool_grid(features: Tensor, row: Tensor, col: Tensor, out_rows: int, out_cols: int, grid: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Adaptive average pooling of tokens at ``(row, col)`` of a ``grid`` into ``out_rows x out_cols`` cells
    (the windows of ``torch.nn.AdaptiveAvgPool2d``). Returns ``(first_token_of_each_cell, pooled)`` over
    non-empty cells, in row-major cell order."""
    rows, cols = grid
    cell_r = (row * out_rows) // rows
    cell_c = (col * out_cols) // cols
    cell = cell_r * out_cols + cell_c
    n_cells = out_rows * out_cols
    d = features.shape[-1]
    sums = torch.zeros(n_cells, d, dtype=torch.float32, device=features.device).index_add_(0, cell, features.float())
    counts = torch.zeros(n_cells, device=features.device).index_add_(0, cell, torch.ones_like(cell, dtype=torch.float32))
    first = torch.full((n_cells,), -1, dtype=torch.long, device=row.device)
    first.scatter_reduce_(0, cell, torch.arange(row.numel(), device=row.device), reduce="amin", include_self=False)
    nonempty = counts > 0
    return first[nonempty], (sums[nonempty] / counts[nonempty, None]).to(features.dtype)


@dataclass
class PoolConfig(ShortenConfig):
    stride: int = param(2, lo=1, doc="pooling window (stride x stride) when no budget is given")


@register_plugin
class PoolPlugin(Plugin):
    name = "pool"
    stages = ("visual",)
    Config = PoolConfig

    def out_grid(self, rows: int, cols: int, n_views: int = 1) -> tuple[int, int]:
        c = self.config
        if not c.has_budget:
            return math.ceil(rows / c.stride), math.ceil(cols / c.stride)
        keep = c.keep if c.keep is not None else min(1.0, c.tokens / (rows * cols * n_views))
        s = math.sqrt(keep)
        return max(1, min(rows, round(rows * s))), max(1, min(cols, round(cols * s)))

    def select(self, tokens: VisualTokens) -> Selection:
        keep, feats = [], []
        rows, cols = tokens.grid
        views = tokens.views()
        oh, ow = self.out_grid(rows, cols, len(views))
        for _, idx in views:
            if oh == rows and ow == cols:
                keep.append(idx)
                feats.append(tokens.features[idx])
                continue
            first, pooled = pool_grid(tokens.features[idx], tokens.row[idx], tokens.col[idx], oh, ow, (rows, cols))
            keep.append(idx[first])
            feats.append(pooled)
        return Selection(keep=torch.cat(keep), replace=torch.cat(feats))
