"""Attention rows computed on the side, so the model itself keeps SDPA / FlashAttention.

A method that scores tokens by attention needs a few rows of one layer's attention matrix (the last
token's row, the CLS row). These functions recompute exactly those rows from the layer's own projections:
``q`` for the needed rows, ``k`` for every position, the layer's rotary embedding, KV-head repetition for
GQA, the layer's scaling and mask, then a float32 softmax.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor


def _rotary_fn(attn: torch.nn.Module):
    mod = sys.modules[type(attn).__module__]
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        raise NotImplementedError(f"no apply_rotary_pos_emb next to {type(attn).__name__}")
    return fn


def llm_attention_rows(
    attn: torch.nn.Module,
    hidden: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    mask: Tensor | None,
    rows: Tensor,
) -> Tensor:
    """Attention probabilities ``[B, H, Q, L]`` of query positions ``rows`` ``[B, Q]`` over all ``L`` keys.

    ``hidden`` is the input of ``attn`` (after the input norm), ``position_embeddings`` the ``(cos, sin)``
    the layer receives, ``mask`` its 4D mask (additive float or boolean ``True = attend``) or ``None`` for
    plain causal attention.
    """
    b, l, _ = hidden.shape
    head_dim = attn.head_dim
    cos, sin = position_embeddings
    gidx = rows.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    hq = hidden.gather(1, gidx)
    q = attn.q_proj(hq).view(b, rows.shape[1], -1, head_dim).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, l, -1, head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos_b = cos.expand(b, -1, -1)
    sin_b = sin.expand(b, -1, -1)
    ridx = rows.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
    rope = _rotary_fn(attn)
    q, _ = rope(q, q, cos_b.gather(1, ridx), sin_b.gather(1, ridx))
    _, k = rope(k, k, cos_b, sin_b)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scaling
    if mask is None:
        allowed = torch.arange(l, device=hidden.device)[None, None, :] <= rows[:, :, None]
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    else:
        m = mask.expand(b, -1, -1, -1)
        m = m.gather(2, rows[:, None, :, None].expand(-1, m.shape[1], -1, m.shape[-1]))[..., :l]
        if m.dtype == torch.bool:
            scores = scores.masked_fill(~m, float("-inf"))
        else:
            scores = scores + m.float()
    return torch.softmax(scores, dim=-1)


def vit_cls_attention(attn: torch.nn.Module, hidden: Tensor, bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """CLS-row attention of a ViT attention module (CLIP-style ``q_proj`` / ``k_proj``, CLS at index 0).

    ``hidden`` ``[B, T, D]`` is the module's input. Returns ``(probs, logits)``, each ``[B, H, T]``:
    post-softmax probabilities and pre-softmax logits of the CLS query over every token.
    """
    b, t, d = hidden.shape
    heads = attn.num_heads
    hd = d // heads
    q = attn.q_proj(hidden[:, :1]).view(b, 1, heads, hd).transpose(1, 2)
    k = attn.k_proj(hidden).view(b, t, heads, hd).transpose(1, 2)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)).squeeze(2) * attn.scale
    biased = logits if bias is None else logits + bias.reshape(b, 1, -1).float()
    return torch.softmax(biased, dim=-1), logits


def llm_rows_against_cache(
    attn: torch.nn.Module,
    hidden: Tensor,
    position_embeddings: tuple[Tensor, Tensor],
    cached_keys: Tensor,
    mask: Tensor | None,
) -> Tensor:
    """During decoding: attention probabilities ``[B, H, q, S + q]`` of the ``q`` new tokens (``hidden``, the
    attention module's input) over the ``S`` cached keys (post-RoPE, ``[B, H_kv, S, d]``) and themselves."""
    b, q, _ = hidden.shape
    head_dim = attn.head_dim
    cos, sin = position_embeddings
    qs = attn.q_proj(hidden).view(b, q, -1, head_dim).transpose(1, 2)
    ks = attn.k_proj(hidden).view(b, q, -1, head_dim).transpose(1, 2)
    if hasattr(attn, "q_norm"):
        qs, ks = attn.q_norm(qs), attn.k_norm(ks)
    qs, ks = _rotary_fn(attn)(qs, ks, cos, sin)
    k = torch.cat([cached_keys.to(ks.dtype), ks], dim=2)
    groups = qs.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
    scores = torch.matmul(qs.float(), k.float().transpose(-1, -2)) * attn.scaling
    s_total = k.shape[2]
    causal = torch.ones(q, s_total, dtype=torch.bool, device=hidden.device).tril(diagonal=s_total - q)
    scores = scores.masked_fill(~causal, float("-inf"))
    if mask is not None:
        m = mask[..., :s_total]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    return torch.softmax(scores, dim=-1)
