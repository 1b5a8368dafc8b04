"""Speed of one method on one batch: prefill, decode, memory, FLOPs, and the oracle twin.

Timing: ``warmup`` runs, then the median of ``repeats``; on CUDA, CUDA events around the call after a
synchronisation. Prefill = one forward pass over the prompts (vision tower included) returning the last
position's logits (time to first token). Decode per token is timed inside one ``generate`` call with
``1 + n`` new tokens: a logits processor stamps the clock (after a CUDA synchronisation) when the first
token's logits arrive, and the call's end closes it, so (end - first stamp) / ``n`` covers exactly the
``n`` decode steps, against the cache the call's own prefill built (for OPERA the span also holds its
rollbacks).
End-to-end = ``generate`` with the task's new tokens (rows stop at their end-of-sequence
token); generated tokens/s counts the tokens really generated, each row up to its first end-of-sequence token.

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA (reset before the method's runs); on the CPU the
process's peak resident set size so far (``ru_maxrss``), which only grows — read it as an upper bound.

FLOPs (analytic, multiply-adds counted as 2): for a decoder layer holding ``n`` tokens with hidden size
``d``, ``q``/``kv`` projection widths and MLP width ``m`` (gated: 3 matrices),
``2 n (d q + 2 d kv + q d) + 2 n (3 d m) + 2 n^2 q`` (attention scores and weighted values over a causal
half: ``2 * n^2/2 * q`` each), summed over layers with each layer's own visual-token count; plus the vision
tower, ``2 T (4 d_v^2 + 2 d_v m_v) + 4 T^2 d_v`` per ViT layer at its token count ``T``.
The oracle is the model simply fed the same visual tokens per LLM layer, with no selection work:
``oracle:tokens=n`` when every layer sees ``n``, ``oracle-llm:layer=K,tokens=n`` when layers from ``K`` on
see fewer (``n``: the largest count in the batch, as the padded batch holds). The method's and the
oracle's prefills are timed alternately (method, oracle, method, ...), so that drift in the machine's
speed during a run touches both alike; each figure is the median of its ``repeats``.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import sys
import time
from typing import Any, Callable

import torch

import mmtoken
from mmtoken.models import eos_token_ids


def _timer(device: str) -> Callable[[Callable[[], Any]], float]:
    if device.startswith("cuda"):
        def run(fn: Callable[[], Any]) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000.0
        return run

    def run_cpu(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    return run_cpu


class _FirstTokenClock:
    """A logits processor that records when it is first called (the first token's logits are ready)."""

    def __init__(self, device: str):
        self.device = device
        self.first: float | None = None
        self.calls = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.first is None:
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.first = time.perf_counter()
        return scores


def decode_time_per_token(generate: Callable[..., Any], device: str, n: int, repeats: int) -> float:
    """Median over ``repeats`` (after one warm-up) of (end of ``generate`` - first token ready) / ``n``, for
    ``generate(logits_processor=..., max_new_tokens=1 + n, min_new_tokens=1 + n)``."""
    from transformers.generation.logits_process import LogitsProcessorList

    if n < 1 or repeats < 1:
        raise ValueError(f"decode timing needs n >= 1 and repeats >= 1, got n={n}, repeats={repeats}")
    times = []
    for i in range(repeats + 1):
        clock = _FirstTokenClock(device)
        generate(logits_processor=LogitsProcessorList([clock]), max_new_tokens=1 + n, min_new_tokens=1 + n)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        end = time.perf_counter()
        if clock.calls < 1 + n:
            raise RuntimeError(f"generate called its logits processors {clock.calls} times for {1 + n} tokens: "
                               "decode time cannot be stamped")
        if i:
            times.append((end - clock.first) / n)
    return statistics.median(times)


def median_time(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> float:
    timer = _timer(device)
    for _ in range(warmup):
        timer(fn)
    return statistics.median(timer(fn) for _ in range(repeats))


def peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def llm_flops(config: Any, tokens_per_layer: list[float]) -> float:
    tc = config.text_config
    d = tc.hidden_size
    head = getattr(tc, "head_dim", None) or d // tc.num_attention_heads
    q = tc.num_attention_heads * head
    kv = tc.num_key_value_heads * head
    m = tc.intermediate_size
    total = 0.0
    for n in tokens_per_layer:
        total += 2 * n * (d * q + 2 * d * kv + q * d) + 2 * n * 3 * d * m + 2 * n * n * q
    return total


def vit_flops(config: Any, tokens_per_layer: list[float]) -> float:
    vc = config.vision_config
    d, m = vc.hidden_size, vc.intermediate_size
    return sum(2 * t * (4 * d * d + 2 * d * m) + 4 * t * t * d for t in tokens_per_layer)


def decode_flops_per_token(config: Any, context_per_layer: list[float]) -> float:
    tc = config.text_config
    d = tc.hidden_size
    head = getattr(tc, "head_dim", None) or d // tc.num_attention_heads
    q, kv, m = tc.num_attention_heads * head, tc.num_key_value_heads * head, tc.intermediate_size
    per_layer = 2 * (d * q + 2 * d * kv + q * d) + 2 * 3 * d * m
    return sum(per_layer + 4 * c * q for c in context_per_layer) + 2 * d * tc.vocab_size


def generated_tokens(new_ids: torch.Tensor, generation_config: Any) -> int:
    """Tokens really generated in a batch: each row up to and including its first end-of-sequence token."""
    eos = eos_token_ids(generation_config)
    if not eos or new_ids.shape[1] == 0:
        return int(new_ids.numel())
    hit = torch.isin(new_ids, torch.tensor(eos, device=new_ids.device))
    first = torch.where(hit.any(-1), hit.int().argmax(-1) + 1, torch.full_like(hit[:, 0], new_ids.shape[1], dtype=torch.long))
    return int(first.sum())


def flop_counts(config: Any, text_tokens: float, visual_per_layer: list[float]) -> dict[str, Any]:
    """``prefill_flops`` (vision tower at its full token count — for merging plugins an upper bound —
    plus the LLM at ``text_tokens`` + each layer's visual tokens), ``decode_flops_per_token`` and the
    per-layer visual tokens they were computed from."""
    vc = config.vision_config
    n_vit = (vc.image_size // vc.patch_size) ** 2 + 1
    context = [text_tokens + v for v in visual_per_layer]
    return {
        "prefill_flops": llm_flops(config, context) + vit_flops(config, [n_vit] * vc.num_hidden_layers),
        "decode_flops_per_token": decode_flops_per_token(config, context),
        "visual_tokens_per_layer": visual_per_layer,
    }


def oracle_spec(visual_per_layer: dict[int, list[int]], full: list[int]) -> str | None:
    """The oracle of a run whose LLM layers saw ``visual_per_layer`` visual tokens (per sample)."""
    if not visual_per_layer:
        return None
    layers = sorted(visual_per_layer)
    first = [visual_per_layer[layers[0]][i] for i in range(len(full))]
    parts = []
    if first != full:
        parts.append(f"oracle:tokens={max(1, max(first))}")
    for l in layers[1:]:
        if visual_per_layer[l] != visual_per_layer[layers[0]]:
            parts.append(f"oracle-llm:layer={l},tokens={max(1, max(visual_per_layer[l]))}")
            break
    return "+".join(parts) if parts else None


def measure(lm: Any, items: list, method: str, max_new_tokens: int, device: str, repeats: int = 5, warmup: int = 2, decode_tokens: int = 8) -> dict[str, Any]:
    """Speed figures of ``method`` on the batch ``items`` (see the module docstring)."""
    from .runner import prepare_inputs

    model = lm.model
    inputs = prepare_inputs(lm, items, device)
    full = [int(x) for x in (inputs["input_ids"] == model.config.image_token_id).sum(-1)]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def prefill() -> None:
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    def gen(**kw: Any) -> None:
        with torch.inference_mode():
            model.generate(**inputs, do_sample=False, **kw)

    generated: list[int] = []

    def e2e() -> None:
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        generated.append(generated_tokens(out[:, inputs["input_ids"].shape[1]:], model.generation_config))

    handle = mmtoken.apply(model, method) if method != "none" else None
    try:
        prefill()
        stats = handle.stats if handle is not None else None
        layers = dict(stats.llm_visual_tokens) if stats is not None else {}
        n_layers = model.config.text_config.num_hidden_layers
        if layers:
            per_layer = [sum(layers.get(l, full)) / len(full) for l in range(n_layers)]
        else:
            per_layer = [sum(full) / len(full)] * n_layers
        text_tokens = float(inputs["attention_mask"].sum(-1).float().mean()) - sum(full) / len(full)
        decode_s = decode_time_per_token(gen, device, decode_tokens, max(1, repeats // 2))
        e2e_s = median_time(e2e, device, 0, max(1, repeats // 2))
        mem = peak_memory(device)
    finally:
        if handle is not None:
            handle.remove()
    b = len(items)
    out = {
        "batch_size": b,
        "prefill_s": None,
        "decode_s_per_token": decode_s,
        "e2e_s": e2e_s,
        "samples_per_s": b / e2e_s,
        "tokens_per_s": generated[-1] / e2e_s,
        "peak_mem_bytes": mem,
        **flop_counts(model.config, text_tokens, per_layer),
        "text_tokens": text_tokens,
        "oracle": None,
        "oracle_prefill_s": None,
    }
    spec = oracle_spec(layers, full) if layers and method != "none" else None
    legs = [method] if spec is None else [method, spec]  # timed alternately
    timer = _timer(device)
    times: list[list[float]] = [[] for _ in legs]
    for i in range(warmup + repeats):
        for leg, which in zip(times, legs):
            with mmtoken.apply(model, which) if which != "none" else contextlib.nullcontext():
                t = timer(prefill)
            if i >= warmup:
                leg.append(t)
    out["prefill_s"] = statistics.median(times[0])
    if spec is not None:
        out["oracle_prefill_s"] = statistics.median(times[1])
        out["oracle"] = spec
    return out
