"""A first look at prefill speed: plugin vs. full model vs. oracle (the model simply fed the kept tokens).

Builds a random-initialised LLaVA-1.5-shaped model (CLIP-style tower at 336 px / patch 14 = 576 visual
tokens, LLaMA-style LLM), then times one forward pass over a batch of prompts (vision tower included) for
each method: median of ``repeats`` runs after ``warmup`` runs, all in one process.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

import mmtoken
from mmtoken.testing import make_batch, tiny_llava


@dataclass
class PrefillRow:
    method: str
    visual_tokens: float
    seconds: float


def build_model(size: str = "small", attn: str = "sdpa") -> torch.nn.Module:
    """``small``: 336 px, patch 14 (576 tokens), ViT 256 x 6, LLM 512 x 8 (GQA 8/4 heads)."""
    if size == "small":
        return tiny_llava(image_size=336, patch_size=14, vision_hidden=256, vision_layers=6, vision_heads=4,
                          text_hidden=512, text_layers=8, text_heads=8, text_kv_heads=4, vocab=1024, attn=attn)
    if size == "test":
        return tiny_llava(image_size=112, patch_size=14, attn=attn)
    raise ValueError(f"unknown size {size!r}")


def time_prefill(model: torch.nn.Module, batch: dict, spec: str | None, warmup: int, repeats: int) -> PrefillRow:
    handle = mmtoken.apply(model, spec) if spec else None
    try:
        times = []
        with torch.inference_mode():
            for i in range(warmup + repeats):
                t0 = time.perf_counter()
                model(**batch, logits_to_keep=1)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        if handle is not None:
            layers = handle.stats.llm_visual_tokens
            last = layers[max(layers)]
            visual = sum(last) / len(last)
        else:
            visual = float((batch["input_ids"] == model.config.image_token_id).sum(-1).float().mean())
    finally:
        if handle is not None:
            handle.remove()
    return PrefillRow(spec or "none", visual, statistics.median(times))


def run(keep: float = 0.25, batch_size: int = 1, size: str = "small", warmup: int = 2, repeats: int = 5) -> list[PrefillRow]:
    model = build_model(size)
    batch = make_batch(model, batch_size, seed=0, prompt_lens=[24] * batch_size)
    specs = [None, f"visionzip:keep={keep}", f"oracle:keep={keep}", f"fastv:k=2,keep={keep}", f"oracle-llm:layer=2,keep={keep}"]
    return [time_prefill(model, batch, s, warmup, repeats) for s in specs]


def format_table(rows: list[PrefillRow]) -> str:
    full = rows[0].seconds
    oracle = {"visionzip": "oracle:", "fastv": "oracle-llm:"}
    by_prefix = {r.method.split(":")[0]: r for r in rows}
    lines = ["| method | visual tokens (last LLM layer) | prefill s | speedup vs full | speedup vs its oracle |", "|---|---|---|---|---|"]
    for r in rows:
        name = r.method.split(":")[0]
        o = by_prefix.get(oracle.get(name, "").rstrip(":"))
        vs_oracle = f"{o.seconds / r.seconds:.2f}x" if o is not None else ""
        lines.append(f"| `{r.method}` | {r.visual_tokens:.0f} | {r.seconds:.3f} | {full / r.seconds:.2f}x | {vs_oracle} |")
    return "\n".join(lines)
