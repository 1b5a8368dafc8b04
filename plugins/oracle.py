"""Oracles: the model simply fed fewer visual tokens, with no selection cost.

``oracle`` (`visual` stage) keeps the first ``n`` tokens of each image; ``oracle-llm`` (`llm` stage)
keeps the first ``n`` image tokens from decoder layer ``layer`` on. They are what a plugin's speed is
compared against: the difference between a plugin and its oracle at the same token count is the plugin's
own overhead. Their accuracy means nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmtoken.config import BudgetConfig, ShortenConfig, param
from mmtoken.plugin import LLMContext, LLMDrop, Plugin, register_plugin
from mmtoken.tokens import Selection, VisualTokens


@dataclass
class OracleConfig(ShortenConfig):
    pass


@register_plugin
class OraclePlugin(Plugin):
    name = "oracle"
    stages = ("visual",)
    Config = OracleConfig

    def select(self, tokens: VisualTokens) -> Selection:
        n = self.config.budget(len(tokens), default_keep=0.25)
        return Selection(keep=torch.arange(n, device=tokens.features.device))


@dataclass
class OracleLLMConfig(BudgetConfig):
    layer: int = param(2, lo=1, doc="decoder layer from which the image tokens are cut")


def keep_first_image_tokens(image_mask: Tensor, valid: Tensor, n_keep: list[int]) -> list[Tensor]:
    """Per sample: every valid non-image position plus the first ``n_keep[b]`` image positions."""
    out = []
    for b in range(image_mask.shape[0]):
        img = image_mask[b].nonzero().flatten()[: n_keep[b]]
        other = (valid[b] & ~image_mask[b]).nonzero().flatten()
        out.append(torch.sort(torch.cat([other, img]))[0])
    return out


@register_plugin
class OracleLLMPlugin(Plugin):
    name = "oracle-llm"
    stages = ("llm",)
    Config = OracleLLMConfig

    def llm_plan(self, n_layers: int) -> list[LLMDrop]:
        return [LLMDrop(layer=min(self.config.layer, n_layers - 1))]

    def llm_keep(self, ctx: LLMContext) -> list[Tensor]:
        counts = ctx.image_mask.sum(-1).tolist()
        n_keep = [self.config.budget(int(c), default_keep=0.25) if c else 0 for c in counts]
        return keep_first_image_tokens(ctx.image_mask, ctx.valid, n_keep)
