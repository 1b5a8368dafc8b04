"""``globalcom2``: GlobalCom² (Liu et al., 2025, arXiv 2501.05179), `visual` stage, for AnyRes inputs.

The thumbnail (LLaVA-NeXT's base view) is the "commander" that tells each high-resolution crop how many
tokens it may keep:

1. Thumbnail: keep its top ``floor(N r)`` tokens by CLS score (``N`` tokens per view).
2. Crop budgets: each thumbnail patch is mapped to the crop cell it covers (uniformly: patch row ``i`` of
   ``h`` lies in crop row ``i * gh // h``); ``S_c`` = sum of the thumbnail's scores in cell ``c``;
   ``sigma = softmax((S - max S) / tau)``; ``scale_c = min(1, r (1 + sigma_c - mean(sigma)))``.
3. Inside crop ``c``: global score = the thumbnail's score map resized (bilinear) to the whole
   ``gh*h x gw*w`` crop grid and sliced to crop ``c``; local score = the crop's own CLS scores;
   combined = L2-normalised(local) + L2-normalised(global); keep the top ``floor(N_c scale_c)`` (``N_c``:
   the crop's tokens left after unpadding).
4. The LLM receives the kept thumbnail tokens, then the kept crop tokens, in spatial order with one
   newline per kept row.

Parameters: ``r`` = retention (default 0.25; or the common budget: ``keep`` = r, ``tokens`` = r x tokens of
the image), ``tau`` (default 10), ``layer`` (ViT layer of the scores, default -1: the last layer, as the
official code, while features come from layer -2), ``score``: ``"logits"`` (pre-softmax CLS logits averaged
over heads: the official choice), ``"probs"`` (post-softmax), or ``"norm"`` — **ours**, a fallback for
vision towers without a CLS token: the L2 norm of each token's vision feature.

Choices we made: thumbnail tokens go to the LLM in spatial order (the official code emits them in
descending score order); on single-view images (LLaVA-1.5, or a LLaVA-NeXT image with no crops) only step 1
applies. Crops get at least one token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmtoken.config import ShortenConfig, param
from mmtoken.plugin import Plugin, register_plugin
from mmtoken.tokens import Selection, VisualRequest, VisualTokens


def crop_budgets(thumb: Tensor, crop_grid: tuple[int, int], r: float, tau: float) -> Tensor:
    """``scale_c`` for each crop (row-major), from the thumbnail score map ``thumb`` ``[h, w]``."""
    h, w = thumb.shape
    gh, gw = crop_grid
    rows = torch.arange(h, device=thumb.device) * gh // h
    cols = torch.arange(w, device=thumb.device) * gw // w
    cell = (rows[:, None] * gw + cols[None, :]).flatten()
    s = torch.zeros(gh * gw, dtype=torch.float32, device=thumb.device).index_add_(0, cell, thumb.flatten().float())
    sigma = torch.softmax((s - s.max()) / tau, dim=0)
    return torch.clamp(r * (1 + sigma - sigma.mean()), max=1.0)


def global_scores(thumb: Tensor, crop_grid: tuple[int, int], grid: tuple[int, int]) -> Tensor:
    """The thumbnail map resized (bilinear) to the full crop canvas: ``[gh*h, gw*w]``."""
    gh, gw = crop_grid
    h, w = grid
    return F.interpolate(thumb[None, None].float(), size=(gh * h, gw * w), mode="bilinear", align_corners=False)[0, 0]


def _l2(x: Tensor) -> Tensor:
    return x / x.norm().clamp_min(1e-12)


@dataclass
class GlobalCom2Config(ShortenConfig):
    r: float | None = param(None, lo=0.0, hi=1.0, lo_open=True, doc="r: retention ratio (default 0.25)")
    tau: float = param(10.0, lo=0.0, lo_open=True, doc="tau: temperature of the crop-budget softmax")
    layer: int = param(-1, doc="ViT layer whose CLS attention scores tokens")
    score: str = param("logits", choices=("logits", "probs", "norm"), doc="score source; 'norm' is a CLS-free fallback (ours)")

    def validate(self) -> None:
        super().validate()
        self.refuse_with_budget(self.r is not None, "r=")


@register_plugin
class GlobalCom2Plugin(Plugin):
    name = "globalcom2"
    stages = ("visual",)
    Config = GlobalCom2Config

    def visual_request(self) -> VisualRequest:
        c = self.config
        if c.score == "logits":
            return VisualRequest(cls_logits=(c.layer,))
        if c.score == "probs":
            return VisualRequest(cls_attn=(c.layer,))
        return VisualRequest()

    def retention(self, n_tokens: int) -> float:
        c = self.config
        if c.r is not None:
            return c.r
        if c.tokens is not None:
            return min(1.0, c.tokens / n_tokens)
        return c.keep if c.keep is not None else 0.25

    def scores(self, tokens: VisualTokens) -> Tensor:
        c = self.config
        if c.score == "logits":
            return tokens.require("cls_logits", c.layer).float()
        if c.score == "probs":
            return tokens.require("cls_attn", c.layer).float()
        return tokens.vision_features.float().norm(dim=-1)

    def select(self, tokens: VisualTokens) -> Selection:
        r = self.retention(len(tokens))
        score = self.scores(tokens)
        h, w = tokens.grid
        thumb_idx = tokens.view(0)
        keep = [thumb_idx[torch.topk(score[thumb_idx], max(1, int(thumb_idx.numel() * r))).indices]]
        if tokens.crop_grid is not None and thumb_idx.numel() == h * w:
            gh, gw = tokens.crop_grid
            thumb = torch.zeros(h * w, device=score.device)
            thumb[tokens.row[thumb_idx] * w + tokens.col[thumb_idx]] = score[thumb_idx]
            thumb = thumb.view(h, w)
            scale = crop_budgets(thumb, (gh, gw), r, self.config.tau)
            canvas = global_scores(thumb, (gh, gw), (h, w))
            for c in range(1, gh * gw + 1):
                idx = tokens.view(c)
                if idx.numel() == 0:
                    continue
                cr, cc = divmod(c - 1, gw)
                g = canvas[cr * h + tokens.row[idx], cc * w + tokens.col[idx]]
                combined = _l2(score[idx]) + _l2(g)
                k = max(1, int(idx.numel() * float(scale[c - 1])))
                keep.append(idx[torch.topk(combined, min(k, idx.numel())).indices])
        return Selection(keep=torch.cat(keep))
