"""Train ``tiny-flextok`` on the synthetic world's scenes, on the CPU, seeded.

    python scripts/train_flextok.py --out runs/flextok                 # the shipped recipe
    python scripts/train_flextok.py --quick --out /tmp/ft               # a few steps: checks the script

Training scenes use the world's training seeds; the curve's PSNR is measured on held-out scenes at every
prefix length ``k = 1, 2, 4, ..., K``. Writes ``OUT/tokenizer`` (safetensors + config) and ``OUT/curve.json``;
checkpoints as it goes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmtoken.tokenizers import FlexTok, FlexTokConfig  # noqa: E402
from mmtoken.tokenizers.evaluate import psnr  # noqa: E402
from mmtoken.world import render_batch  # noqa: E402
from mmtoken.world.scenes import sample_scene  # noqa: E402
from mmtoken.world.tasks import HELD_OUT  # noqa: E402


def images(seeds, size: int) -> torch.Tensor:
    return render_batch([sample_scene(int(s)) for s in seeds], size)


def prefix_lengths(k: int) -> list[int]:
    return [2**i for i in range(int(math.log2(k)) + 1) if 2**i <= k]


@torch.no_grad()
def evaluate(tok: FlexTok, x: torch.Tensor, steps: int) -> dict[str, float]:
    tok.eval()
    ids = tok.encode(x)
    out = {f"psnr@{k}": float(psnr(tok.decode(ids[:, :k], steps=steps), x).mean()) for k in prefix_lengths(tok.n_tokens)}
    out["codes_used"] = int(torch.unique(ids).numel())
    tok.train()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--image-size", type=int, default=48)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=3, help="encoder and decoder layers each")
    ap.add_argument("--registers", type=int, default=32)
    ap.add_argument("--levels", default="8,5,5,5")
    ap.add_argument("--p-pure-noise", type=float, default=0.0)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--eval-steps", type=int, default=25, help="Euler steps when decoding for the curve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.eval_n, args.batch, args.eval_steps = 3, 3, 4, 4, 2
        args.dim, args.layers, args.registers = 32, 1, 8
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    cfg = FlexTokConfig(image_size=args.image_size, patch=args.patch, dim=args.dim, heads=4, enc_layers=args.layers,
                        dec_layers=args.layers, registers=args.registers, levels=[int(v) for v in args.levels.split(",")],
                        p_pure_noise=args.p_pure_noise)
    tok = FlexTok(cfg)
    opt = torch.optim.AdamW(tok.parameters(), lr=args.lr, weight_decay=0.01)
    held = images(range(HELD_OUT, HELD_OUT + args.eval_n), args.image_size)
    curve = {"args": vars(args), "train": [], "eval": []}
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        x = images(rng.integers(0, 5_000_000, size=args.batch), args.image_size) * 2 - 1
        loss = tok.loss(x, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            curve["train"].append({"step": step, "loss": float(loss.detach()), "s": time.time() - t0})
            print(f"step {step} loss {float(loss.detach()):.4f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            ev = evaluate(tok, held, args.eval_steps) | {"step": step + 1, "s": time.time() - t0}
            curve["eval"].append(ev)
            print("eval", ev, flush=True)
            tok.save_pretrained(os.path.join(args.out, "tokenizer"), extra={"trained_by": "scripts/train_flextok.py"})
            with open(os.path.join(args.out, "curve.json"), "w") as f:
                json.dump(curve, f, indent=1)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
