"""``random``: keep a seeded, uniformly random subset of each image's visual tokens (`visual` stage).

The subset is drawn from ``torch.Generator().manual_seed(seed)`` over the token indices of each image, so
every image with the same number of tokens keeps the same positions: results do not depend on the batch
an image is in, and a run is reproducible. Budget: ``keep`` (default 0.25) or ``tokens`` per image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmtoken.config import ShortenConfig, param
from mmtoken.plugin import Plugin, register_plugin
from mmtoken.tokens import Selection, VisualTokens


def random_subset(n_tokens: int, n_keep: int, seed: int) -> Tensor:
    """``n_keep`` distinct indices of ``range(n_tokens)``, sorted, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n_tokens, generator=g)[:n_keep])[0]


@dataclass
class RandomConfig(ShortenConfig):
    seed: int = param(0, lo=0, doc="seed of the random subset")


@register_plugin
class RandomPlugin(Plugin):
    name = "random"
    stages = ("visual",)
    Config = RandomConfig

    def select(self, tokens: VisualTokens) -> Selection:
        n = len(tokens)
        keep = random_subset(n, self.config.budget(n, default_keep=0.25), self.config.seed)
        return Selection(keep=keep.to(tokens.features.device))
