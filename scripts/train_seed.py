"""Train ``tiny-seed`` on the synthetic world's scenes, on the CPU, seeded; the frozen ViT is the shipped
tiny-llava's vision tower.

    python scripts/train_seed.py --out runs/seed                 # both stages
    python scripts/train_seed.py --quick --out /tmp/seed          # a few steps: checks the script

Stage 1 (contrastive): the causal Q-Former's last query, projected, against an embedding of the scene's
caption (a bag of the world's words, trained with it), InfoNCE both ways. Stage 2, with the Q-Former
frozen: ``5 L_VQ + 2 (1 - cos) + 0.5 MSE`` plus the pixel decoder's loss; ``--restart-every`` moves
codes left unused onto encoder outputs. Writes ``OUT/tokenizer`` and ``OUT/curve.json`` (losses, held-out
codebook usage and PSNR).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmtoken.models import load_model  # noqa: E402
from mmtoken.tokenizers import Seed, SeedConfig  # noqa: E402
from mmtoken.tokenizers.evaluate import psnr  # noqa: E402
from mmtoken.world import render_batch  # noqa: E402
from mmtoken.world.scenes import sample_scene  # noqa: E402
from mmtoken.world.tasks import HELD_OUT, caption, vocabulary  # noqa: E402


def batch(seeds, size):
    scenes = [sample_scene(int(s)) for s in seeds]
    return render_batch(scenes, size), [caption(s) for s in scenes]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="tiny-llava", help="whose vision tower is the frozen ViT")
    ap.add_argument("--stage1-steps", type=int, default=500)
    ap.add_argument("--stage2-steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--codes", type=int, default=1024)
    ap.add_argument("--gen-grid", type=int, default=0, help="generation embedding: 0 = the ViT's pooled CLS vector (the paper's one "
                    "vector); g = its features pooled to g x g (ours)")
    ap.add_argument("--restart-every", type=int, default=100,
                    help="every N stage-2 steps, codes unused in those steps restart on encoder outputs, until 80%% of the steps (0: never)")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.stage1_steps, args.stage2_steps, args.batch, args.eval_every, args.eval_n = 2, 2, 4, 2, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    lm = load_model(args.model)
    vit = lm.model.model.vision_tower
    vc = vit.config
    cfg = SeedConfig(image_size=vc.image_size, vision={k: getattr(vc, k) for k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size")},
        feature_layer=lm.model.config.vision_feature_layer, codes=args.codes, gen_grid=args.gen_grid)
    tok = Seed(cfg)
    tok.vit.load_state_dict(vit.state_dict())
    del lm
    size = cfg.image_size
    words = {w: i for i, w in enumerate(vocabulary())}
    text = torch.nn.EmbeddingBag(len(words), cfg.dim, mode="mean")
    img_proj, txt_proj = torch.nn.Linear(cfg.dim, 64), torch.nn.Linear(cfg.dim, 64)
    scale = torch.nn.Parameter(torch.tensor(2.66))
    held, _ = batch(range(HELD_OUT, HELD_OUT + args.eval_n), size)
    curve = {"args": vars(args), "stage1": [], "stage2": [], "eval": []}
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)

    # stage 1: contrastive
    trainable = [p for p in tok.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable + list(text.parameters()) + list(img_proj.parameters()) + list(txt_proj.parameters()) + [scale], lr=args.lr)
    for step in range(args.stage1_steps):
        x, caps = batch(rng.integers(0, 5_000_000, size=args.batch), size)
        feats, _ = tok.vit_features(x)
        last = F.normalize(img_proj(tok.qformer_out(feats)[:, -1]), dim=-1)
        ids = [torch.tensor([words[w] for w in c.split() if w in words]) for c in caps]
        offsets = torch.tensor([0] + [len(i) for i in ids[:-1]]).cumsum(0)
        t = F.normalize(txt_proj(text(torch.cat(ids), offsets)), dim=-1)
        logits = scale.exp() * last @ t.t()
        target = torch.arange(len(caps))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == args.stage1_steps - 1:
            curve["stage1"].append({"step": step, "loss": float(loss.detach()), "s": time.time() - t0})
            print(f"stage1 {step} loss {float(loss.detach()):.3f} {time.time() - t0:.0f}s", flush=True)

    # stage 2: VQ + reconstruction
    # the causal Q-Former learned in stage 1 is frozen: its embeddings are the targets the codes must keep
    # (trained on, the VQ and reconstruction losses collapse it to one constant embedding, one code)
    for p in [tok.queries, *tok.qformer.parameters(), *tok.q_norm.parameters()]:
        p.requires_grad_(False)
    trainable = [p for p in tok.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr)
    snapshot = tok.vq.usage.clone()
    g = torch.Generator().manual_seed(args.seed)
    for step in range(args.stage2_steps):
        x, _ = batch(rng.integers(0, 5_000_000, size=args.batch), size)
        losses = tok.losses(x)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        restarted = 0
        if args.restart_every and (step + 1) % args.restart_every == 0 and step + 1 < args.stage2_steps * 0.8:
            restarted = tok.vq.restart_dead(snapshot, g)
            snapshot = tok.vq.usage.clone()
        if step % 50 == 0 or restarted:
            rec = {k: float(v.detach()) for k, v in losses.items()} | {"step": step, "s": time.time() - t0, "restarted": restarted}
            curve["stage2"].append(rec)
            print("stage2", {k: round(v, 4) for k, v in rec.items()}, flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.stage2_steps - 1:
            tok.eval()
            ids = torch.cat([tok.encode(held[i : i + 50]) for i in range(0, len(held), 50)])
            recon = torch.cat([tok.decode(ids[i : i + 50]) for i in range(0, len(ids), 50)])
            ev = {"step": step + 1, "codes_used": int(torch.unique(ids).numel()), "usage": int(torch.unique(ids).numel()) / cfg.codes,
                  "psnr": float(psnr(recon, held).mean()), "s": time.time() - t0}
            curve["eval"].append(ev)
            print("eval", ev, flush=True)
            tok.train()
            tok.save_pretrained(os.path.join(args.out, "tokenizer"), extra={"trained_by": "scripts/train_seed.py"})
            with open(os.path.join(args.out, "curve.json"), "w") as f:
                json.dump(curve, f, indent=1)
    print(f"done in {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
