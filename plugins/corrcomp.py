"""``corrcomp``: token-level correlation-guided compression (Zhang et al., 2024, arXiv 2407.14439),
`visual` stage, per crop (and per single image).

For each view (the base image and every AnyRes crop, or the one image of LLaVA-1.5):

1. Global information: the CLS attention of a deep ViT layer (``deep``, default -2); the outlier tokens
   (score > Q3 + 1.5 IQR) are kept.
2. Local information: pattern repetitiveness. A token is redundant when another token of the view has a
   key (shallow layer ``shallow``, heads concatenated) with cosine similarity above ``threshold``;
   information density = 1 - redundant / N. ``n = round(density x N)`` tokens are sampled without
   replacement with probabilities proportional to the CLS attention of the shallow layer, from the tokens
   that are not already outliers (ours: the paper takes a union and does not say whether the sample may
   repeat outliers; drawing from the rest makes ``n`` the number of tokens the sample adds).
3. The union of both sets is kept, in spatial order, from the final feature layer.

The method is parameter-free in the paper; the layers, the threshold and the clipping of ``n`` are not
given — ours: ``deep=-2`` (the feature layer), ``shallow=1``, ``threshold=0.9``, ``n`` clipped to
``[1, N]``. Sampling uses ``torch.Generator().manual_seed(seed + view index)``, so a run is reproducible and
independent of the batch. With the common budget (``keep`` / ``tokens`` per view), the sampled count is
set to ``budget - |outliers|`` (at least 0) instead of ``density x N``, so plugins compare at equal
budgets (``keep`` per view; ``tokens``, a count per image, shared among the views by size); the outliers
are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmtoken.config import ShortenConfig, param
from mmtoken.plugin import Plugin, register_plugin
from mmtoken.tokens import Selection, VisualRequest, VisualTokens


def iqr_outliers(scores: Tensor) -> Tensor:
    """Indices of ``scores`` above ``Q3 + 1.5 (Q3 - Q1)``."""
    q1, q3 = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device))
    return (scores > q3 + 1.5 * (q3 - q1)).nonzero().flatten()


def information_density(keys: Tensor, threshold: float) -> float:
    """1 - (share of tokens whose key has a near-duplicate: cosine similarity > ``threshold``)."""
    k = keys.float()
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = k @ k.T
    sim.fill_diagonal_(-1.0)
    redundant = (sim > threshold).any(-1)
    return 1.0 - float(redundant.float().mean())


def corrcomp_select(deep_attn: Tensor, shallow_attn: Tensor, shallow_keys: Tensor, threshold: float, seed: int, n_sample: int | None = None) -> Tensor:
    """Kept indices of one view (sorted)."""
    n = deep_attn.numel()
    outliers = iqr_outliers(deep_attn)
    if n_sample is None:
        n_sample = int(round(information_density(shallow_keys, threshold) * n))
    n_sample = max(0, min(n, n_sample))
    rest = torch.ones(n, dtype=torch.bool, device=deep_attn.device)
    rest[outliers] = False
    rest = rest.nonzero().flatten()
    n_sample = min(n_sample, rest.numel())
    picked = torch.zeros(0, dtype=torch.long, device=deep_attn.device)
    if n_sample > 0:
        g = torch.Generator().manual_seed(seed)
        probs = shallow_attn[rest].float().clamp_min(0).cpu() + 1e-12
        picked = rest[torch.multinomial(probs, n_sample, replacement=False, generator=g).to(deep_attn.device)]
    keep = torch.unique(torch.cat([outliers, picked]))
    if keep.numel() == 0:
        keep = deep_attn.argmax().view(1)
    return keep


@dataclass
class CorrCompConfig(ShortenConfig):
    deep: int = param(-2, doc="ViT layer of the global (outlier) CLS attention")
    shallow: int = param(1, doc="ViT layer of the sampling CLS attention and the redundancy keys")
    threshold: float = param(0.9, lo=-1.0, hi=1.0, doc="key cosine above which two tokens are near-duplicates")
    seed: int = param(0, lo=0, doc="seed of the sampling")


@register_plugin
class CorrCompPlugin(Plugin):
    name = "corrcomp"
    stages = ("visual",)
    Config = CorrCompConfig

    def visual_request(self) -> VisualRequest:
        c = self.config
        return VisualRequest(cls_attn=(c.deep, c.shallow), keys=(c.shallow,))

    def select(self, tokens: VisualTokens) -> Selection:
        c = self.config
        deep = tokens.require("cls_attn", c.deep)
        shallow = tokens.require("cls_attn", c.shallow)
        keys = tokens.require("keys", c.shallow)
        keep = []
        for view, idx, budget in c.per_view(tokens):
            n_sample = None
            if c.has_budget:
                n_sample = budget - int(iqr_outliers(deep[idx]).numel())
            keep.append(idx[corrcomp_select(deep[idx], shallow[idx], keys[idx], c.threshold, c.seed + view, n_sample)])
        return Selection(keep=torch.cat(keep))
