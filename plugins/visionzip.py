"""``visionzip``: VisionZip (Yang et al., CVPR 2025), `visual` stage.

1. Dominant tokens: the ``dominant`` tokens with the highest CLS attention of ViT layer ``layer``
   (default -2, the feature layer), summed over heads.
2. Contextual tokens: of the rest, ``contextual`` targets are taken uniformly (every ``step``-th token);
   each other token joins the target whose key (mean over heads, L2-normalised) is most similar; each
   group is averaged — in vision-feature space, before the projector, as in the official code.
3. The LLM receives the dominant tokens (in spatial order) followed by the contextual tokens.

Budget: ``tokens``/``keep`` gives the total, split ``dominant = total - contextual`` with
``contextual = round(total * contextual_ratio)`` (official LLaVA-1.5 64 = 54 + 10: ratio 10/64). Choices
we made: the official code counts the CLS token as one of the dominant tokens; the Hugging Face LLaVA
path drops CLS before the projector, so all ``dominant`` tokens here are patches. On AnyRes models the
budget applies per view (base image and each crop), as VisionZip does for LLaVA-NeXT (``keep`` to every
view; ``tokens``, a count per image, shared among the views by size); contextual tokens
of every view follow the image's kept tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmtoken.config import ShortenConfig, param
from mmtoken.plugin import Plugin, register_plugin
from mmtoken.tokens import Selection, VisualRequest, VisualTokens


def visionzip_select(cls_attn: Tensor, keys: Tensor, vision_features: Tensor, n_dominant: int, n_contextual: int, num_heads: int) -> tuple[Tensor, Tensor]:
    """VisionZip on one view. ``cls_attn`` ``[T]``, ``keys`` ``[T, H*d]``, ``vision_features`` ``[T, Dv]``.
    Returns ``(dominant indices [n_dominant], contextual vision features [n_contextual, Dv])``."""
    t = cls_attn.shape[0]
    n_dominant = min(n_dominant, t)
    dominant = torch.topk(cls_attn.float(), n_dominant).indices
    rest_mask = torch.ones(t, dtype=torch.bool, device=cls_attn.device)
    rest_mask[dominant] = False
    rest = rest_mask.nonzero().flatten()
    n_contextual = min(n_contextual, rest.numel())
    if n_contextual == 0:
        return dominant, vision_features[:0]
    metric = keys[rest].view(rest.numel(), num_heads, -1).mean(1).float()
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, rest.numel() // n_contextual)
    targets = torch.arange(0, rest.numel(), step, device=rest.device)[:n_contextual]
    is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=rest.device)
    is_target[targets] = True
    others = (~is_target).nonzero().flatten()
    sim = metric[others] @ metric[targets].T
    assign = sim.argmax(-1)
    feats = vision_features[rest].float()
    sums = feats[targets].clone().index_add_(0, assign, feats[others])
    counts = torch.ones(n_contextual, device=feats.device).index_add_(0, assign, torch.ones(others.numel(), device=feats.device))
    return dominant, (sums / counts[:, None]).to(vision_features.dtype)


@dataclass
class VisionZipConfig(ShortenConfig):
    layer: int = param(-2, doc="ViT layer whose CLS attention and keys are used")
    contextual_ratio: float = param(10 / 64, lo=0.0, hi=1.0, doc="share of the budget given to contextual tokens")
    num_heads: int = param(0, lo=0, doc="heads to average keys over (0: the vision tower's own)")


@register_plugin
class VisionZipPlugin(Plugin):
    name = "visionzip"
    stages = ("visual",)
    Config = VisionZipConfig

    def visual_request(self) -> VisualRequest:
        return VisualRequest(cls_attn=(self.config.layer,), keys=(self.config.layer,))

    def split(self, total: int) -> tuple[int, int]:
        """(dominant, contextual) tokens of a view keeping ``total``."""
        contextual = int(round(total * self.config.contextual_ratio))
        if total > 1:
            contextual = min(contextual, total - 1)
        else:
            contextual = 0
        return total - contextual, contextual

    def select(self, tokens: VisualTokens) -> Selection:
        layer = self.config.layer
        attn = tokens.require("cls_attn", layer)
        keys = tokens.require("keys", layer)
        heads = self.config.num_heads or tokens.vit_heads
        keep, extra = [], []
        for _, idx, total in self.config.per_view(tokens, default_keep=64 / 576):
            dom, ctx = visionzip_select(attn[idx], keys[idx], tokens.vision_features[idx], *self.split(total), heads)
            keep.append(idx[dom])
            extra.append(ctx)
        return Selection(keep=torch.cat(keep), extra_vision=torch.cat(extra))

