"""``cmai``: cross-modal attention inhibition, the attention half of VMTC / CMAI (arXiv 2411.15453),
`attention` stage.

For a text query ``t`` and an image key ``v`` at an LLM layer, the focus score aggregates text -> image
attention through text -> text attention: ``focus(t, v) = sum_u A[t, u] A[u, v]`` over the text tokens
``u`` (``A``: the layer's attention probabilities, mean over heads, computed on the side so the model
keeps SDPA). In every text query's row, the ``ratio`` share of image keys with the lowest focus is
inhibited by an additive ``-strength`` on the attention logits — in prefill and in every decode step
(generated tokens are text: they query, and their rows join the sum for later steps).

No public code exists and the paper gives no hyperparameters; ours, all exposed: ``strength`` (lambda,
default 1.0 logit), ``ratio`` (default 0.5), layers ``start`` (default 1) to the last. With
``strength = 0`` the model is untouched. After an `llm`-stage plugin (FastV, DyVTE) shortened a layer's
sequence, that layer inhibits over the image tokens it kept, in prefill and decoding alike. The remembered rows (every cached token's attention over the image) are
stored inside the KV cache as an extra layer, so they follow beam search's row reorders and OPERA's
candidate choice and rollbacks (tested: beam search with and without the cache agree). Pair it with
``vmtc`` for the paper's method: ``"vmtc:keep=0.25+cmai"``.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mmtoken.attention import llm_attention_rows, llm_rows_against_cache
from mmtoken.cache_state import PositionState, attach_state
from mmtoken.config import PluginConfig, param
from mmtoken.plugin import Plugin, register_plugin


def inhibition(focus: Tensor, image: Tensor, queries: Tensor, ratio: float) -> Tensor:
    """Boolean ``[B, Q, K]``: for every query row in ``queries`` ``[B, Q]``, the ``floor(ratio * n_image)``
    image keys (``image`` ``[B, K]``) of lowest ``focus`` ``[B, Q, K]``."""
    masked = focus.float().masked_fill(~image[:, None, :], float("inf"))
    rank = masked.argsort(dim=-1).argsort(dim=-1)
    k = (image.sum(-1).float() * ratio).floor().long()  # [B]
    return (rank < k[:, None, None]) & image[:, None, :] & queries[:, :, None]


@dataclass
class CMAIConfig(PluginConfig):
    strength: float = param(1.0, lo=0.0, doc="lambda: logit penalty on inhibited text -> image pairs (0: off)")
    ratio: float = param(0.5, lo=0.0, hi=1.0, doc="share of image keys inhibited in each text query's row")
    start: int = param(1, lo=0, doc="first decoder layer with inhibition")


@register_plugin
class CMAIPlugin(Plugin):
    name = "cmai"
    stages = ("attention",)
    Config = CMAIConfig
    compresses = False

    def __init__(self, config: CMAIConfig):
        super().__init__(config)
        # layer -> (weak reference to the cache, its state layer [B, S, L0]: A[u, v] for every cached position u, image v); the state
        # lives in the KV cache, so beam reorders, rollbacks and OPERA's candidate choice apply to it too
        self._rows: dict[int, tuple[Any, PositionState]] = {}
        self._n_layers = 0

    def attention_layers(self, n_layers: int) -> list[int]:
        self._n_layers = n_layers
        return list(range(min(self.config.start, n_layers), n_layers))

    def attention_bias(self, layer: int, q_len: int, kv_len: int, ctx: dict[str, Any]) -> Tensor | None:
        if self.config.strength == 0:
            return None
        run, module, kw = ctx["run"], ctx["module"], ctx["kwargs"]
        normed = module.input_layernorm(ctx["hidden"])
        with torch.no_grad():
            if run.mode == "prefill":
                return self._prefill(layer, module, normed, kw, ctx)
            return self._decode(layer, module, normed, kw, ctx, kv_len)

    def _prefill(self, layer, module, normed, kw, ctx) -> Tensor | None:
        image, valid = ctx["image_mask"], ctx["valid"]
        self._rows.pop(layer, None)
        if not bool(image.any()):
            return None
        b, n, _ = normed.shape
        rows = torch.arange(n, device=normed.device).expand(b, -1)
        a = llm_attention_rows(module.self_attn, normed, kw["position_embeddings"], ctx["mask"], rows).mean(1)
        a = torch.nan_to_num(a, nan=0.0)  # padding rows attend nowhere
        text = valid & ~image
        uv = a * image[:, None, :] * text[:, :, None]  # A[u, v] for text u, image v
        cache = kw.get("cache")
        slot = attach_state(cache, self._n_layers, uv)
        if slot is not None:
            self._rows[layer] = (weakref.ref(cache), slot)
        focus = torch.matmul(a * text[:, None, :], uv)
        hit = inhibition(focus, image, text, self.config.ratio)
        return (hit.float() * -self.config.strength)[:, None]

    def _decode(self, layer, module, normed, kw, ctx, kv_len) -> Tensor | None:
        image0 = ctx.get("prefill_image_mask")
        cache = kw.get("cache")
        entry = self._rows.get(layer)
        if image0 is None or entry is None or entry[0]() is not cache or not bool(image0.any()):
            return None
        slot = entry[1]
        stored = slot.get()
        keys = cache.layers[layer].keys
        a = llm_rows_against_cache(module.self_attn, normed, kw["position_embeddings"], keys, ctx["mask"]).mean(1)
        a = torch.nan_to_num(a, nan=0.0)
        b, q, total = a.shape
        l0 = image0.shape[1]
        new_rows = a[:, :, :l0] * image0[:, None, :]  # the new tokens are text: their rows join the sum
        rows = torch.cat([stored, new_rows], dim=1)
        slot.set(rows)
        focus = torch.matmul(a, rows[:, :total])
        hit = inhibition(focus, image0, torch.ones(b, q, dtype=torch.bool, device=a.device), self.config.ratio)
        bias = torch.zeros(b, 1, q, kv_len, device=a.device)
        bias[:, 0, :, :l0] = hit.float() * -self.config.strength
        return bias
