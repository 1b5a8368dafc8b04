"""GPU check for the decode and exit methods on a 7B-shaped random LLaVA-1.5 (bf16, SDPA), no downloads:
per generated token, ``opera`` vs plain ``beam`` at equal beams (batch 1, forced length), and the prefill of
``dyvte:mode=fixed`` exits against the FLOP reduction they predict.

    python scripts/gpu_decode_check.py            # on a GPU machine
    python scripts/gpu_decode_check.py --tiny     # the same code path on small shapes (CPU)
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmtoken  # noqa: E402
from gpu_check import shapes  # noqa: E402
from mmtoken.benchmarks.speed import decode_time_per_token, flop_counts, median_time  # noqa: E402
from mmtoken.testing import make_batch, tiny_llava  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="prompts per generate call (decoding rows only)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sh = shapes(args.tiny)
    model = tiny_llava(**sh, attn="sdpa", device=device, dtype=dtype)
    batch = {k: v.to(device) for k, v in make_batch(model, args.batch, seed=0, prompt_lens=[32] * args.batch).items()}
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    n = args.new_tokens
    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print(f"\n| decoding (batch {args.batch}) | ms per generated token |\n|---|---|")
    for spec in ("beam:num_beams=5", "opera:num_beams=5", "greedy"):
        with mmtoken.apply(model, spec):
            def gen(**kw):
                with torch.inference_mode():
                    model.generate(**batch, do_sample=False, **kw)
            per = decode_time_per_token(gen, device, n, 3)
        print(f"| `{spec}` | {per * 1e3:.1f} |", flush=True)
    if args.batch > 1:
        return
    layers = model.config.text_config.num_hidden_layers
    full_tokens = int((batch["input_ids"] == model.config.image_token_id).sum())
    text = batch["input_ids"].shape[1] - full_tokens

    def prefill():
        with torch.inference_mode():
            model(**batch, logits_to_keep=1)

    base = median_time(prefill, device, 2, 5)
    f_full = flop_counts(model.config, text, [full_tokens] * layers)["prefill_flops"]
    print("\n| prefill (batch 1) | ms | speedup | FLOP reduction predicts |\n|---|---|---|---|")
    print(f"| full | {base * 1e3:.1f} | 1.00x | 1.00x |")
    for layer in (layers // 4, layers // 2):
        with mmtoken.apply(model, f"dyvte:mode=fixed,layer={layer}"):
            t = median_time(prefill, device, 2, 5)
        f = flop_counts(model.config, text, [full_tokens] * layer + [0] * (layers - layer))["prefill_flops"]
        print(f"| `dyvte:mode=fixed,layer={layer}` | {t * 1e3:.1f} | {base / t:.2f}x | {f_full / f:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
