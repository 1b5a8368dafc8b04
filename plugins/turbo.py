"""``turbo``: Turbo, informativity-driven token merging (Ju et al., ECCV 2024, arXiv 2407.11717),
`vision` stage.

ToMe's bipartite matching inside each ViT block (between attention and MLP), with the merge score of an
A-token ``i`` and a B-token ``j`` lowered for tokens that carry semantic value:

``score(i, j) = cos(k_i, k_j) - alpha * C * beta^|gamma - l| * clsattn(i)``

``k``: keys averaged over heads; ``clsattn``: the post-softmax CLS -> token attention of the layer, averaged
over heads, computed on the side; ``l``: the layer index. The ``r`` A-tokens with the highest best score
merge into their partners (size-weighted averages, sizes tracked) and proportional attention adds
``log(size)`` to later attention logits. The CLS token never merges.

Parameters (paper symbols): ``r`` per layer (or the common budget ``keep`` / ``tokens``, spread over the
layers as in ``tome``), ``alpha`` (default 5), ``C`` (``c``, default 100, the official LLaVA value; 30 for
BLIP), ``beta`` (default 1), ``gamma`` (default 0). ``one_shot=True`` is the FOLDER variant: all merges
happen at the last layer that feeds the projector, in one step (repeated matching rounds of at most half
the tokens each, since one bipartite round can remove at most half). With ``alpha = 0`` Turbo is ToMe.
Merges beyond half of a layer's tokens (large budgets on few layers) also take several rounds, in the
last used layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from mmtoken.config import param
from mmtoken.plugin import Plugin, VisionContext, register_plugin

from .tome import ToMeConfig, merge_rounds, merge_schedule


@dataclass
class TurboConfig(ToMeConfig):
    alpha: float = param(5.0, lo=0.0, doc="alpha: weight of the informativity (CLS attention) term")
    c: float = param(100.0, lo=0.0, doc="C: scale of the CLS attention (100 for LLaVA, 30 for BLIP)")
    beta: float = param(1.0, lo=0.0, doc="beta: per-layer decay of the informativity weight")
    gamma: float = param(0.0, doc="gamma: the layer where the informativity weight peaks")
    one_shot: bool = param(False, doc="FOLDER variant: every merge at the last used layer")


@register_plugin
class TurboPlugin(Plugin):
    name = "turbo"
    stages = ("vision",)
    Config = TurboConfig

    def vision_wants_cls_attn(self) -> bool:
        return self.config.alpha > 0

    def vision_layers(self, n_layers: int, n_tokens: int) -> list[int]:
        n_patches = n_tokens - 1
        c = self.config
        total = c.r * n_layers if c.r is not None else n_patches - c.budget(n_patches, default_keep=1 / 3)
        if c.one_shot:
            self._schedule = [0] * (n_layers - 1) + [total]
        else:
            self._schedule = merge_schedule(n_tokens, n_layers, total)
        return [i for i, r in enumerate(self._schedule) if r > 0]

    def vision_merge(self, ctx: VisionContext) -> None:
        c = self.config
        b, t, _ = ctx.keys.shape
        metric = ctx.keys.view(b, t, ctx.num_heads, -1).mean(2)
        weight = c.alpha * c.c * c.beta ** abs(c.gamma - ctx.layer)
        penalty = weight * ctx.cls_attn if (ctx.cls_attn is not None and weight) else None
        ctx.x, ctx.sizes, ctx.pos = merge_rounds(ctx.x, metric, ctx.sizes, ctx.pos, self._schedule[ctx.layer], ctx.has_cls, penalty)
