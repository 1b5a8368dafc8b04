"""GPU check: 7B-shaped LLaVA-1.5 and LLaVA-NeXT with random weights (bf16, SDPA), no downloads.

For every plugin at 25% of the visual tokens, prints prefill latency (batch 1 and 8), per-token
decode latency, the oracle's prefill (the model simply fed the same visual tokens) and the uncompressed
model's, as a Markdown table. Shapes: CLIP ViT-L/14 at 336 px (576 tokens per view) + a LLaMA-7B-shaped
LLM (4096 x 32 layers, 11008 MLP); LLaVA-NeXT adds AnyRes crops up to 672 x 672 (2,880 visual tokens).

    bash scripts/gpu_check.sh                 # on a GPU machine; ~2-4 minutes
    python scripts/gpu_check.py --tiny        # the same code path on small shapes (CPU, or --device cuda), with
                                              # ragged prompts and mixed image sizes in a batch
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmtoken  # noqa: E402
from mmtoken.benchmarks.speed import decode_time_per_token, median_time, oracle_spec  # noqa: E402
from mmtoken.testing import make_batch, make_next_batch, tiny_llava  # noqa: E402

METHODS = [
    "none", "random:keep=0.25", "pool:stride=2", "visionzip:keep=0.25", "fastv:k=2,keep=0.25", "tome:keep=0.25",
    "turbo:keep=0.25", "globalcom2:keep=0.25", "corrcomp:keep=0.25", "vmtc:keep=0.25", "vmtc:keep=0.25+cmai",
]


def shapes(tiny: bool) -> dict:
    if tiny:
        return dict(image_size=112, patch_size=14, vision_hidden=64, vision_layers=4, vision_heads=4, text_hidden=128,
                    text_layers=4, text_heads=4, text_kv_heads=4, vocab=256)
    return dict(image_size=336, patch_size=14, vision_hidden=1024, vision_layers=24, vision_heads=16, text_hidden=4096,
                text_layers=32, text_heads=32, text_kv_heads=32, vocab=32064, intermediate=(4096, 11008))


def bench_model(model, batch, device, methods, decode_tokens=16, repeats=5):
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "pixel_values" in batch:
        batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
    full = [int(x) for x in (batch["input_ids"] == model.config.image_token_id).sum(-1)]

    def prefill():
        with torch.inference_mode():
            model(**batch, logits_to_keep=1)

    def gen(**kw):
        with torch.inference_mode():
            model.generate(**batch, do_sample=False, **kw)

    rows = []
    for method in methods:
        try:
            handle = mmtoken.apply(model, method) if method != "none" else None
        except mmtoken.MmtokenError as exc:
            rows.append((method, None, None, None, None, str(exc).split(";")[0][:60]))
            continue
        try:
            prefill()
            layers = dict(handle.stats.llm_visual_tokens) if handle else {}
            p = median_time(prefill, device, 2, repeats)
            d = decode_time_per_token(gen, device, decode_tokens, 3)
        finally:
            if handle:
                handle.remove()
        spec = oracle_spec(layers, full) if layers else None
        o = None
        if spec:
            with mmtoken.apply(model, spec):
                o = median_time(prefill, device, 2, repeats)
        last = layers[max(layers)][0] if layers else full[0]
        rows.append((method, last, p, o, d, spec or ""))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=5, help="timed prefill repeats (median) after 2 warm-ups")
    args = ap.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    print(f"device: {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, dtype {dtype}, torch {torch.__version__}")
    t0 = time.time()
    for name in ("llava-1.5", "llava-next"):
        nxt = name == "llava-next"
        sh = shapes(args.tiny)
        s = sh["image_size"]
        model = tiny_llava(**sh, attn="sdpa", next=nxt, device=device, dtype=dtype,
                           grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]] if nxt else None)
        for b in [int(x) for x in args.batch_sizes.split(",")]:
            if nxt:
                mixed = [(2 * s, 2 * s), (s, 2 * s), (2 * s, s), (s, s)]
                batch = make_next_batch(model, [mixed[i % 4] for i in range(b)] if args.tiny else [(2 * s, 2 * s)] * b, seed=0)
            else:
                batch = make_batch(model, b, seed=0, prompt_lens=[32 - 5 * (i % 4) if args.tiny else 32 for i in range(b)])
            print(f"\n### {name}-{'tiny' if args.tiny else '7B'}-shaped, batch {b}, {int((batch['input_ids'][0] == model.config.image_token_id).sum())} visual tokens per sample\n")
            print("| method | visual tokens (last layer) | prefill ms | oracle prefill ms | plugin / oracle | vs full | decode ms/token | oracle |")
            print("|---|---|---|---|---|---|---|---|")
            rows = bench_model(model, batch, device, METHODS, repeats=args.repeats)
            full = rows[0][2]
            for method, vis, p, o, d, spec in rows:
                if p is None:
                    print(f"| `{method}` | n/a | | | | | | {spec} |")
                    continue
                ratio = f"{p / o:.2f}" if o else ""
                oracle = f"{o * 1e3:.1f}" if o else ""
                print(f"| `{method}` | {vis} | {p * 1e3:.1f} | {oracle} | {ratio} | {full / p:.2f}x | {d * 1e3:.2f} | {spec} |")
            sys.stdout.flush()
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
