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


def outlier_masks(scores: Tensor) -> Tensor:
    """``[V, N]`` scores -> ``[V, N]`` True where a score lies above its row's ``Q3 + 1.5 (Q3 - Q1)``."""
    q = torch.quantile(scores.float(), torch.tensor([0.25, 0.75], device=scores.device), dim=-1)  # [2, V]
    return scores > (q[1] + 1.5 * (q[1] - q[0]))[:, None]


def iqr_outliers(scores: Tensor) -> Tensor:
    """Indices of ``scores`` above ``Q3 + 1.5 (Q3 - Q1)``."""
    return outlier_masks(scores[None])[0].nonzero().flatten()


def densities(keys: Tensor, threshold: float) -> Tensor:
    """``[V, N, Dk]`` keys -> ``[V]``: 1 - (share of a view's tokens whose key has a near-duplicate in the
    view: cosine similarity > ``threshold``)."""
    k = keys.float()
    k = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sim = k @ k.transpose(1, 2)
    sim.diagonal(dim1=1, dim2=2).fill_(-1.0)
    return 1.0 - (sim > threshold).any(-1).float().mean(-1)


def information_density(keys: Tensor, threshold: float) -> float:
    """1 - (share of tokens whose key has a near-duplicate: cosine similarity > ``threshold``)."""
    return float(densities(keys[None], threshold)[0])


def corrcomp_select_views(deep_attn: Tensor, shallow_attn: Tensor, shallow_keys: Tensor, threshold: float,
                          seeds: list[int], n_samples: list[int | None], outliers: Tensor | None = None) -> list[Tensor]:
    """Kept indices (sorted) of ``V`` views of ``N`` tokens each, computed together: ``deep_attn`` /
    ``shallow_attn`` ``[V, N]``, ``shallow_keys`` ``[V, N, Dk]``; view ``v`` samples with ``seeds[v]`` and
    adds ``n_samples[v]`` tokens (None: ``round(density x N)``). ``outliers``: ``outlier_masks(deep_attn)``
    when the caller has it already."""
    n = deep_attn.shape[1]
    outliers = outlier_masks(deep_attn) if outliers is None else outliers
    dens = densities(shallow_keys, threshold) if any(m is None for m in n_samples) else None
    out_counts = outliers.sum(-1).tolist()
    keeps = []
    for v, (seed, n_sample) in enumerate(zip(seeds, n_samples)):
        if n_sample is None:
            n_sample = int(round(float(dens[v]) * n))
        rest = (~outliers[v]).nonzero().flatten()
        n_sample = max(0, min(n, n_sample, rest.numel()))
        keep = outliers[v]
        if n_sample > 0:
            g = torch.Generator().manual_seed(seed)
            probs = shallow_attn[v, rest].float().clamp_min(0).cpu() + 1e-12
            keep = keep.clone()
            keep[rest[torch.multinomial(probs, n_sample, replacement=False, generator=g).to(deep_attn.device)]] = True
        if out_counts[v] == 0 and n_sample == 0:
            keep = torch.zeros_like(keep)
            keep[deep_attn[v].argmax()] = True
        keeps.append(keep.nonzero().flatten())
    return keeps


def corrcomp_select(deep_attn: Tensor, shallow_attn: Tensor, shallow_keys: Tensor, threshold: float, seed: int, n_sample: int | None = None) -> Tensor:
    """Kept indices of one view (sorted)."""
    return corrcomp_select_views(deep_attn[None], shallow_attn[None], shallow_keys[None], threshold, [seed], [n_sample])[0]


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
        views = c.per_view(tokens)
        by_size: dict[int, list[tuple[int, Tensor, int]]] = {}
        for view in views:  # views of one size (all but unpadded crops) are computed together
            by_size.setdefault(int(view[1].numel()), []).append(view)
        keep = []
        for group in by_size.values():
            idx = torch.stack([i for _, i, _ in group])  # [V, N]
            d = deep[idx]
            outliers = outlier_masks(d)
            n_samples: list[int | None] = [None] * len(group)
            if c.has_budget:
                n_samples = [budget - o for (_, _, budget), o in zip(group, outliers.sum(-1).tolist())]
            kept = corrcomp_select_views(d, shallow[idx], keys[idx], c.threshold, [c.seed + v for v, _, _ in group], n_samples,
                                         outliers)
            keep += [i[k] for i, k in zip(idx, kept)]
        return Selection(keep=torch.cat(keep))
