"""``tome``: Token Merging (Bolya et al., ICLR 2023), `vision` stage.

Inside each ViT layer, between attention and MLP: split the tokens alternately into sets A (even) and B
(odd), score every A-B pair by the cosine similarity of their keys (mean over heads), merge the ``r``
A-tokens with the most similar partner into that partner as a size-weighted average (sizes tracked), and
apply proportional attention (``log(size)`` added to the attention logits) in later layers. The CLS
token is never merged.

Parameters: ``r`` tokens merged per layer (paper symbol r), in every ViT layer that feeds the projector;
or the common budget (``keep`` / ``tokens`` of the ``N`` patch tokens), spread as evenly as possible over
those layers (never more than half of a layer's mergeable tokens, except in the last used layer, which
merges what is left in several bipartite rounds). Choice we made: after each merge the
tokens are put back in spatial order (each token sits at its first patch), so the LLM sees the image in
raster order as usual; ToMe's own order (unmerged A, then B) carries no meaning for a ViT but does for an
LLM with positional encodings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmtoken.config import ShortenConfig, param
from mmtoken.plugin import Plugin, VisionContext, register_plugin


def merge_schedule(n_tokens: int, n_layers: int, remove: int, protected: int = 1) -> list[int]:
    """Tokens to merge in each of ``n_layers`` layers so that ``remove`` tokens go in all: as evenly as
    possible, at most half of the mergeable tokens per layer (one bipartite round), except the last layer,
    which takes whatever is left (in several rounds, see :func:`merge_rounds`). ``n_tokens`` counts the
    protected ones."""
    remove = max(0, min(remove, n_tokens - protected - 1))
    sched = []
    left = remove
    t = n_tokens
    for i in range(n_layers):
        want = -(-left // (n_layers - i)) if left > 0 else 0
        r = want if i == n_layers - 1 else min(want, (t - protected) // 2)
        sched.append(r)
        left -= r
        t -= r
    return sched


def merge_rounds(x: Tensor, metric: Tensor, sizes: Tensor, pos: Tensor, r: int, protect_first: bool,
                 penalty: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Merge ``r`` tokens, in as many bipartite rounds as needed (one round merges at most half of the
    mergeable tokens). The metric and penalty of merged tokens are size-weighted means, like the tokens."""
    d, c = x.shape[-1], metric.shape[-1]
    while r > 0:
        step = min(r, (x.shape[1] - int(protect_first)) // 2)
        if step <= 0:
            break
        if step == r:
            return bipartite_merge(x, metric, sizes, pos, step, protect_first, penalty)
        extra = [metric.float()] + ([penalty[..., None].float()] if penalty is not None else [])
        merged, sizes, pos = bipartite_merge(torch.cat([x.float()] + extra, -1), metric, sizes, pos, step, protect_first, penalty)
        x, metric = merged[..., :d].to(x.dtype), merged[..., d : d + c]
        penalty = merged[..., -1] if penalty is not None else None
        r -= step
    return x, sizes, pos


def bipartite_merge(x: Tensor, metric: Tensor, sizes: Tensor, pos: Tensor, r: int, protect_first: bool,
                    penalty: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One step of ToMe's bipartite soft matching with size-weighted merging.

    ``x`` ``[B, T, D]`` tokens, ``metric`` ``[B, T, C]`` keys, ``sizes`` ``[B, T]``, ``pos`` ``[B, T]`` first patch
    of each token. ``penalty`` ``[B, T]``, if given, is subtracted from every score of the A-token it belongs
    to (Turbo's informativity term). Returns the merged ``(x, sizes, pos)`` with ``T - r`` tokens in
    ascending ``pos`` order."""
    if r <= 0:
        return x, sizes, pos
    b, t, d = x.shape
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a_m, b_m = metric[:, ::2], metric[:, 1::2]
    scores = a_m.float() @ b_m.float().transpose(-1, -2)
    if penalty is not None:
        scores = scores - penalty[:, ::2, None].float()
    if protect_first:
        scores[:, 0, :] = float("-inf")
    node_max, node_idx = scores.max(dim=-1)
    edge = node_max.argsort(dim=-1, descending=True)
    src_idx, unm_idx = edge[:, :r], edge[:, r:]
    dst_idx = node_idx.gather(1, src_idx)

    xs = x.float() * sizes[..., None]
    xa, xb = xs[:, ::2], xs[:, 1::2]
    sa, sb = sizes[:, ::2], sizes[:, 1::2]
    pa, pb = pos[:, ::2], pos[:, 1::2]

    def take(v: Tensor, idx: Tensor) -> Tensor:
        return v.gather(1, idx.reshape(*idx.shape, *([1] * (v.dim() - 2))).expand(*idx.shape, *v.shape[2:]))

    xb = xb.scatter_add(1, dst_idx[..., None].expand(-1, -1, d), take(xa, src_idx))
    sb = sb.scatter_add(1, dst_idx, take(sa, src_idx))
    pb = pb.scatter_reduce(1, dst_idx, take(pa, src_idx), reduce="amin")
    x_new = torch.cat([take(xa, unm_idx), xb], dim=1)
    s_new = torch.cat([take(sa, unm_idx), sb], dim=1)
    p_new = torch.cat([take(pa, unm_idx), pb], dim=1)
    order = p_new.argsort(dim=-1)
    x_new, s_new, p_new = take(x_new, order), take(s_new, order), take(p_new, order)
    return (x_new / s_new[..., None]).to(x.dtype), s_new, p_new


@dataclass
class ToMeConfig(ShortenConfig):
    r: int | None = param(None, lo=0, doc="r: tokens merged per ViT layer")

    def validate(self) -> None:
        super().validate()
        self.refuse_with_budget(self.r is not None, "r=")


@register_plugin
class ToMePlugin(Plugin):
    name = "tome"
    stages = ("vision",)
    Config = ToMeConfig

    def vision_layers(self, n_layers: int, n_tokens: int) -> list[int]:
        n_patches = n_tokens - 1
        if self.config.r is not None:
            self._schedule = merge_schedule(n_tokens, n_layers, self.config.r * n_layers)
        else:
            target = self.config.budget(n_patches, default_keep=0.5)
            self._schedule = merge_schedule(n_tokens, n_layers, n_patches - target)
        return [i for i, r in enumerate(self._schedule) if r > 0]

    def vision_merge(self, ctx: VisionContext) -> None:
        r = self._schedule[ctx.layer]
        b, t, d = ctx.keys.shape
        metric = ctx.keys.view(b, t, ctx.num_heads, -1).mean(2)
        ctx.x, ctx.sizes, ctx.pos = merge_rounds(ctx.x, metric, ctx.sizes, ctx.pos, r, ctx.has_cls)
