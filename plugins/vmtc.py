"""``vmtc``: visual token clustering, the visual half of VMTC / CMAI (arXiv 2411.15453), `visual` stage.

No public code exists and the paper gives no hyperparameters; everything below is our reading, exposed
as parameters:

1. Importance of each visual token = its CLS attention at ViT layer ``layer`` (default -2, the feature
   layer; post-softmax, mean over heads).
2. The ``primary`` most important tokens are kept as they are.
3. The other tokens are clustered into ``k`` groups by k-means on cosine similarity of their vision
   features (``iters`` Lloyd steps, default 10; centroids start at the ``k`` most important remaining
   tokens, so the result is deterministic).
4. Each cluster becomes one token: the importance-weighted mean of its members' vision features (before
   the projector, then projected), appended after the primary tokens. An empty cluster contributes the
   token nearest to its centroid. The LLM thus receives exactly ``primary + k`` tokens per view.

Budget: ``keep`` sets ``primary + k`` of every view, ``tokens`` (a count per image) is shared among an
AnyRes image's views by size; each view's share is split by ``cluster_ratio`` (default 0.25 of it goes
to clusters). Or give ``primary`` and ``k`` directly (per view). The cross-modal attention
inhibition half is the separate ``cmai`` plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmtoken.config import ShortenConfig, param
from mmtoken.errors import ConfigError
from mmtoken.plugin import Plugin, register_plugin
from mmtoken.tokens import Selection, VisualRequest, VisualTokens


def cosine_kmeans(x: Tensor, init: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """k-means on the unit sphere. ``x`` ``[N, D]``, ``init`` ``[k]`` indices of the starting centroids.
    Returns ``(assignment [N], centroids [k, D])``."""
    z = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cent = z[init].clone()
    assign = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
    for _ in range(max(1, iters)):
        assign = (z @ cent.T).argmax(-1)
        sums = torch.zeros_like(cent).index_add_(0, assign, z)
        counts = torch.zeros(cent.shape[0], device=z.device).index_add_(0, assign, torch.ones_like(assign, dtype=torch.float32))
        filled = counts > 0
        cent[filled] = sums[filled] / sums[filled].norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return assign, cent


def vmtc_select(importance: Tensor, features: Tensor, n_primary: int, k: int, iters: int) -> tuple[Tensor, Tensor]:
    """Primary indices ``[n_primary]`` and ``k`` merged features ``[k, D]`` of one view."""
    n = importance.numel()
    n_primary = min(n_primary, n)
    order = torch.argsort(importance.float(), descending=True)
    primary, rest = order[:n_primary], order[n_primary:]
    k = min(k, rest.numel())
    if k == 0:
        return primary, features[:0]
    assign, cent = cosine_kmeans(features[rest], torch.arange(k, device=rest.device), iters)  # rest is sorted by importance
    w = importance[rest].float().clamp_min(1e-12)
    sums = torch.zeros(k, features.shape[-1], device=features.device).index_add_(0, assign, features[rest].float() * w[:, None])
    wsum = torch.zeros(k, device=features.device).index_add_(0, assign, w)
    merged = sums / wsum.clamp_min(1e-12)[:, None]
    empty = wsum <= 1e-12
    if bool(empty.any()):
        z = features[rest].float() / features[rest].float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        nearest = (cent[empty] @ z.T).argmax(-1)
        merged[empty] = features[rest][nearest].float()
    return primary, merged.to(features.dtype)


@dataclass
class VMTCConfig(ShortenConfig):
    primary: int | None = param(None, lo=0, doc="primary tokens kept as they are, per view")
    k: int | None = param(None, lo=0, doc="k: clusters merged into one token each, per view")
    cluster_ratio: float = param(0.25, lo=0.0, hi=1.0, doc="share of the budget given to clusters")
    layer: int = param(-2, doc="ViT layer of the CLS attention (importance)")
    iters: int = param(10, lo=1, doc="k-means iterations")

    def validate(self) -> None:
        super().validate()
        if (self.primary is None) != (self.k is None):
            raise ConfigError("vmtc: give both primary= and k=, or neither")
        self.refuse_with_budget(self.primary is not None, "primary= and k=")


@register_plugin
class VMTCPlugin(Plugin):
    name = "vmtc"
    stages = ("visual",)
    Config = VMTCConfig

    def visual_request(self) -> VisualRequest:
        return VisualRequest(cls_attn=(self.config.layer,))

    def split(self, total: int) -> tuple[int, int]:
        """(primary, clusters) of a view keeping ``total`` tokens (``primary=`` / ``k=`` when given)."""
        c = self.config
        if c.primary is not None:
            return c.primary, c.k
        k = min(total - 1, int(round(total * c.cluster_ratio))) if total > 1 else 0
        return total - k, k

    def select(self, tokens: VisualTokens) -> Selection:
        importance = tokens.require("cls_attn", self.config.layer)
        keep, extra = [], []
        for _, idx, total in self.config.per_view(tokens, default_keep=0.25):
            primary, merged = vmtc_select(importance[idx], tokens.vision_features[idx], *self.split(total), self.config.iters)
            keep.append(idx[primary])
            extra.append(merged)
        return Selection(keep=torch.cat(keep), extra_vision=torch.cat(extra))
