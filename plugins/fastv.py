"""``fastv``: FastV (Chen et al., ECCV 2024), `llm` stage.

After decoder layer ``K`` the image tokens that receive the least attention are dropped for every later
layer: the image tokens are ranked by the attention of layer ``K-1`` (mean over heads) and the top
``(1 - R)`` fraction is kept. The attention rows come from a side computation of the needed ``q . k`` rows
(:func:`mmtoken.attention.llm_attention_rows`), so the model keeps SDPA. Kept tokens keep their original
position ids, as in the official code.

Parameters: ``k`` = K (default 2), ``r`` = R, the dropped fraction (default 0.5); or the common budget
(``keep`` = 1 - R, ``tokens`` = kept image tokens per sample). ``queries``: ``"last"`` ranks by the last
token's row (the official inference setting), ``"text"`` by the mean over text tokens after the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmtoken.config import BudgetConfig, param
from mmtoken.errors import ConfigError
from mmtoken.plugin import LLMContext, LLMDrop, Plugin, register_plugin


def fastv_keep(scores: Tensor, image_mask: Tensor, valid: Tensor, n_keep: list[int]) -> list[Tensor]:
    """Per sample: every valid non-image position plus the ``n_keep[b]`` image positions of highest
    ``scores`` ``[B, L]``, sorted by position."""
    out = []
    for b in range(scores.shape[0]):
        img = image_mask[b].nonzero().flatten()
        top = img[torch.topk(scores[b, img].float(), n_keep[b]).indices] if n_keep[b] else img[:0]
        other = (valid[b] & ~image_mask[b]).nonzero().flatten()
        out.append(torch.sort(torch.cat([other, top]))[0])
    return out


@dataclass
class FastVConfig(BudgetConfig):
    k: int = param(2, lo=1, doc="K: image tokens are pruned after this many decoder layers")
    r: float | None = param(None, lo=0.0, hi=1.0, doc="R: fraction of image tokens dropped (default 0.5)")
    queries: str = param("last", choices=("last", "text"), doc="attention rows used for ranking")

    def validate(self) -> None:
        super().validate()
        self.refuse_with_budget(self.r is not None, "r=")

    def n_keep(self, n_image: int) -> int:
        if n_image == 0:
            return 0
        if self.r is not None:
            return max(1, int(round((1.0 - self.r) * n_image)))
        return self.budget(n_image, default_keep=0.5)


@register_plugin
class FastVPlugin(Plugin):
    name = "fastv"
    stages = ("llm",)
    Config = FastVConfig

    def llm_plan(self, n_layers: int) -> list[LLMDrop]:
        if self.config.k >= n_layers:
            raise ConfigError(f"fastv: k={self.config.k} must be below the model's {n_layers} decoder layers")
        return [LLMDrop(layer=self.config.k, rows_from=self.config.k - 1, queries=self.config.queries)]

    def llm_keep(self, ctx: LLMContext) -> list[Tensor]:
        att = ctx.attn  # [B, Q, L]
        q_ok = torch.ones(att.shape[:2], dtype=torch.bool, device=att.device)
        if ctx.attn_queries is not None and self.config.queries == "text":
            q_ok = ctx.valid.gather(1, ctx.attn_queries) & ~ctx.image_mask.gather(1, ctx.attn_queries)
        scores = (att * q_ok[..., None]).sum(1) / q_ok.sum(1, keepdim=True).clamp(min=1)
        n_keep = [self.config.n_keep(int(c)) for c in ctx.image_mask.sum(-1).tolist()]
        return fastv_keep(scores, ctx.image_mask, ctx.valid, n_keep)
