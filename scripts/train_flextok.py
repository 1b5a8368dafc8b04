"""Train a FlexTok tokenizer (meant to become ``tiny-flextok``) on the synthetic world's scenes, on the CPU, seeded.

    python scripts/train_flextok.py --out runs/flextok --threads 1      # the best recipe measured, both stages
    python scripts/train_flextok.py --quick --out /tmp/ft                # a few steps: checks the script

Two stages in latent mode (``--latent-channels C``, the default): (1) a small convolutional auto-encoder
(``conv_ae.py``) learns to map images to a ``C``-channel latent grid and back (``--ae-steps``; skipped with
``--ae-from OUT/ae.safetensors`` of an earlier run); (2) it is frozen, its latents are standardised per
channel and cached for ``--data`` training scenes, and the FlexTok register encoder and flow decoder train
on them. ``--latent-channels 0`` trains the pixel-space FlexTok in one stage, as before.

Training scenes use the world's training seeds; PSNR is measured on held-out scenes: the auto-encoder's
own reconstructions (a bound on everything after it), then FlexTok's at every prefix length
``k = 1, 2, 4, ..., K``. Writes ``OUT/ae.safetensors``, ``OUT/tokenizer`` (safetensors + config) and
``OUT/curve.json``; checkpoints as it goes.
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
from mmtoken.world import render_seeds  # noqa: E402
from mmtoken.world.tasks import HELD_OUT  # noqa: E402


class StepBudget:
    """Fits a run's step count to a wall-clock budget of ``minutes``. The pace is measured from step
    ``WARM`` on (the first steps include warm-up); the count is set at step ``FIRST`` and set once more,
    from the pace so far (evaluations included), once a quarter of the budget has passed."""

    WARM, FIRST = 20, 120

    def __init__(self, minutes: float):
        self.budget_s = minutes * 60
        self.t_warm = None
        self.refitted = False

    def due(self, step: int, elapsed: float) -> bool:
        """Whether :meth:`clock` wants the time after ``step`` steps (``elapsed`` seconds so far)."""
        late = not self.refitted and step > self.FIRST and elapsed > self.budget_s / 4
        return step in (self.WARM, self.FIRST) or late

    def clock(self, step: int, elapsed: float) -> dict | None:
        """Record the (synchronised) time after ``step`` steps; on a re-fit, return ``{"step", "steps",
        "s_per_step"}``: the new step count, at least ``step + 1`` (the last step evaluates and saves)."""
        if step == self.WARM:
            self.t_warm = elapsed
            return None
        self.refitted = step > self.FIRST
        rate = (elapsed - self.t_warm) / (step - self.WARM)
        steps = max(step + 1, int(step + (self.budget_s - elapsed) / rate))
        return {"step": step, "steps": steps, "s_per_step": rate}


def prefix_lengths(k: int) -> list[int]:
    return [2**i for i in range(int(math.log2(k)) + 1) if 2**i <= k]


def cosine_lr(base: float, step: int, steps: int, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))


@torch.no_grad()
def evaluate(tok: FlexTok, x: torch.Tensor, steps: int) -> dict[str, float]:
    tok.eval()
    ids = tok.encode(x)
    out = {f"psnr@{k}": float(psnr(tok.decode(ids[:, :k], steps=steps), x).mean()) for k in prefix_lengths(tok.n_tokens)}
    out["codes_used"] = int(torch.unique(ids).numel())
    tok.train()
    return out


@torch.no_grad()
def ae_psnr(tok: FlexTok, x: torch.Tensor) -> float:
    return float(psnr((tok.ae.decode(tok.ae.encode(x * 2 - 1)).clamp(-1, 1) + 1) / 2, x).mean())


def train_ae(tok: FlexTok, args, held: torch.Tensor, curve: dict) -> None:
    """Stage 1: the auto-encoder alone, on freshly rendered training scenes."""
    ae = tok.ae.requires_grad_(True).train()
    opt = torch.optim.AdamW(ae.parameters(), lr=args.ae_lr, weight_decay=0.0)
    rng = np.random.default_rng(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    for step in range(args.ae_steps):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(args.ae_lr, step, args.ae_steps, 100)
        x = render_seeds(rng.integers(0, 5_000_000, size=args.ae_batch), args.image_size).to(tok.latent_mean.device) * 2 - 1
        loss, rec = ae.loss(x, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            curve["ae_train"].append({"step": step, "loss": float(loss.detach()), "mse": float(rec.detach()), "s": time.time() - t0})
            print(f"ae step {step} loss {float(loss.detach()):.5f} {time.time() - t0:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.ae_steps - 1:
            ae.eval()
            curve["ae_eval"].append({"step": step + 1, "psnr": ae_psnr(tok, held), "s": time.time() - t0})
            ae.train()
            print("ae eval", curve["ae_eval"][-1], flush=True)
            save_ae(tok, args.out)
    ae.requires_grad_(False).eval()


def save_ae(tok: FlexTok, out: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in tok.ae.state_dict().items()}, os.path.join(out, "ae.safetensors"))


@torch.no_grad()
def cache_latents(tok: FlexTok, n: int, size: int, seed: int, chunk: int = 256, workers: int = 0) -> torch.Tensor:
    """The frozen auto-encoder's (unstandardised) latents of ``n`` training scenes, on the CPU. The scenes
    and their order depend on ``seed`` alone; ``workers > 0`` renders them in that many processes."""
    rng = np.random.default_rng(seed + 2)
    seeds = rng.integers(0, 5_000_000, size=n)
    chunks = [seeds[i : i + chunk] for i in range(0, n, chunk)]
    dev = tok.latent_mean.device
    if workers > 0:
        import functools
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            batches = pool.imap(functools.partial(render_seeds, size=size), chunks)  # in order
            return torch.cat([tok.ae.encode(x.to(dev) * 2 - 1).cpu() for x in batches])
    return torch.cat([tok.ae.encode(render_seeds(c, size).to(dev) * 2 - 1).cpu() for c in chunks])


def load_ae(tok: FlexTok, path: str) -> None:
    """``path``: an ``ae.safetensors`` of an earlier run, or a saved FlexTok folder (its ``ae.*`` weights)."""
    from safetensors.torch import load_file

    if os.path.isdir(path):
        weights = load_file(os.path.join(path, "model.safetensors"))
        weights = {k[3:]: v for k, v in weights.items() if k.startswith("ae.")}
    else:
        weights = load_file(path)
    tok.ae.load_state_dict({k: v.float() for k, v in weights.items()})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=3500, help="FlexTok steps (0: train the auto-encoder only)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--patch", type=int, default=4, help="patch side, in latent cells (pixels with --latent-channels 0)")
    ap.add_argument("--dim", type=int, default=192)
    ap.add_argument("--layers", type=int, default=3, help="encoder and decoder layers each")
    ap.add_argument("--registers", type=int, default=16)
    ap.add_argument("--levels", default="8,8,8,5,5,5")
    ap.add_argument("--p-pure-noise", type=float, default=1.0,
                    help="share of each batch at flow time 1 (1.0: a deterministic decoder; decode it with steps=1)")
    ap.add_argument("--nested-probs", default="", help="probabilities of keeping k = 1, 2, 4, ..., K registers in "
                    "nested dropout, comma-separated (default: uniform, as in the paper)")
    ap.add_argument("--latent-channels", type=int, default=8, help="0: pixel space (no auto-encoder)")
    ap.add_argument("--ae-widths", default="16,48,128")
    ap.add_argument("--ae-steps", type=int, default=2000)
    ap.add_argument("--ae-batch", type=int, default=32)
    ap.add_argument("--ae-lr", type=float, default=2e-3)
    ap.add_argument("--ae-noise", type=float, default=0.1)
    ap.add_argument("--ae-from", default="", help="an earlier run's ae.safetensors, or a saved FlexTok folder "
                    "(e.g. mmtoken/checkpoints/tiny-flextok): its auto-encoder is used and stage 1 skipped")
    ap.add_argument("--data", type=int, default=100_000, help="training scenes whose latents are cached (latent mode)")
    ap.add_argument("--latent-cache", default="", help="a safetensors file holding those latents (of the same auto-encoder): read if it exists, else written")
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--eval-n", type=int, default=64)
    ap.add_argument("--eval-steps", type=int, default=1, help="Euler steps when decoding for the curve")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the FlexTok stage's draws then come from a GPU "
                    "generator: the same numbers on another GPU run, not on a CPU run)")
    ap.add_argument("--workers", type=int, default=0, help="processes that render the scenes to cache (0: this one)")
    ap.add_argument("--minutes", type=float, default=0.0, help="fit --steps to this wall-clock budget for the FlexTok "
                    "stage: the step count is set from the pace of steps 20-120 and set again, from the pace so far "
                    "(evaluations included), once a quarter of the budget has passed. The final count and each re-fit "
                    "are written to curve.json ('refits'); repeating the run with that --steps gives the same learning "
                    "rates from the last re-fit on (before it, the schedule used the provisional counts)")
    ap.add_argument("--init", default="", help="continue a saved FlexTok (its tokenizer folder) with this run's "
                    "optimiser settings and --p-pure-noise, e.g. a flow phase after a deterministic one; its "
                    "auto-encoder and latent statistics are kept")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    try:
        dev = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device: cpu, cuda or cuda:N, got {args.device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: this torch sees no CUDA device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise SystemExit(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    nested_probs = [float(v) for v in args.nested_probs.split(",") if v]
    if args.minutes and args.steps <= 120 and not args.quick:
        raise SystemExit("--minutes sets the step count after step 120: give --steps above 120 (an upper bound)")
    if args.quick:
        args.steps, args.eval_every, args.eval_n, args.batch, args.eval_steps = 3, 3, 4, 4, 2
        args.dim, args.layers, args.registers, args.ae_steps, args.ae_batch, args.data = 32, 1, 8, 3, 4, 16
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.init:
        if args.ae_from:
            raise SystemExit("--init keeps the loaded tokenizer's auto-encoder: drop --ae-from")
        tok = FlexTok.from_pretrained(args.init)
        tok.config.p_pure_noise = args.p_pure_noise
        if nested_probs:
            tok.config.nested_probs = nested_probs
        args.image_size = tok.config.image_size  # the architecture is the loaded one's
    else:
        tok = FlexTok(FlexTokConfig(
            image_size=args.image_size, patch=args.patch, dim=args.dim, heads=4, enc_layers=args.layers, dec_layers=args.layers,
            registers=args.registers, levels=[int(v) for v in args.levels.split(",")], p_pure_noise=args.p_pure_noise,
            latent_channels=args.latent_channels, nested_probs=nested_probs, ae_widths=[int(v) for v in args.ae_widths.split(",")], ae_noise=args.ae_noise,
        ))
    tok.to(dev)
    held = render_seeds(range(HELD_OUT, HELD_OUT + args.eval_n), args.image_size).to(dev)
    curve = {"args": vars(args), "ae_train": [], "ae_eval": [], "train": [], "eval": []}
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    data = None
    if tok.ae is not None:
        if args.ae_from:
            load_ae(tok, args.ae_from)
        elif not args.init:  # --init keeps the loaded tokenizer's auto-encoder
            train_ae(tok, args, held, curve)
        curve["ae_psnr"] = ae_psnr(tok, held)
        print(f"auto-encoder: {curve['ae_psnr']:.2f} dB on {args.eval_n} held-out scenes ({time.time() - t0:.0f}s)", flush=True)
        if args.steps == 0:
            with open(os.path.join(args.out, "curve.json"), "w") as f:
                json.dump(curve, f, indent=1)
            return
        if args.latent_cache and os.path.exists(args.latent_cache):
            from safetensors.torch import load_file

            data = load_file(args.latent_cache)["latents"].float()
            if len(data) < args.data:
                raise SystemExit(f"{args.latent_cache}: holds {len(data)} latents, fewer than --data {args.data}")
            data = data[: args.data]
        else:
            data = cache_latents(tok, args.data, args.image_size, args.seed, workers=args.workers)
            if args.latent_cache:
                from safetensors.torch import save_file

                save_file({"latents": data.half().contiguous()}, args.latent_cache)
                data = data.half().float()  # the same values as a later run reading the file
        data = data.to(dev)
        if not args.init:
            tok.latent_mean.copy_(data.mean(dim=(0, 2, 3)))
            tok.latent_std.copy_(data.std(dim=(0, 2, 3)))
        data = (data - tok.latent_mean[:, None, None]) / tok.latent_std[:, None, None]
        print(f"cached {len(data)} latents {tuple(data.shape[1:])} ({time.time() - t0:.0f}s)", flush=True)
    params = [p for n, p in tok.named_parameters() if not n.startswith("ae.")]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    g = torch.Generator(device=dev).manual_seed(args.seed)
    t1 = time.time()
    step, budget = 0, StepBudget(args.minutes) if args.minutes else None
    while step < args.steps:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(args.lr, step, args.steps, 200)
        if data is not None:
            loss = tok.flow_loss(data[torch.from_numpy(rng.integers(0, len(data), size=args.batch)).to(dev)], g)
        else:
            loss = tok.loss(render_seeds(rng.integers(0, 5_000_000, size=args.batch), args.image_size).to(dev) * 2 - 1, g)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            curve["train"].append({"step": step, "loss": float(loss.detach()), "s": time.time() - t1})
            print(f"step {step} loss {float(loss.detach()):.4f} {time.time() - t1:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            ev = evaluate(tok, held, args.eval_steps) | {"step": step + 1, "s": time.time() - t1}
            curve["eval"].append(ev)
            print("eval", ev, flush=True)
            tok.save_pretrained(os.path.join(args.out, "tokenizer"), extra={"trained_by": "scripts/train_flextok.py"})
            with open(os.path.join(args.out, "curve.json"), "w") as f:
                json.dump(curve, f, indent=1)
        step += 1
        if budget and budget.due(step, time.time() - t1):
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)  # the clock must see the queued work
            refit = budget.clock(step, time.time() - t1)
            if refit:
                args.steps = refit["steps"]
                curve["args"]["steps"] = args.steps
                curve.setdefault("refits", []).append(refit)
                print(f"{refit['s_per_step'] * 1000:.1f} ms a step: {args.steps} steps fit {args.minutes} min", flush=True)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
