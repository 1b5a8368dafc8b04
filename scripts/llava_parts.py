"""Move a ``tiny-llava`` run between machines without its frozen vision tower.

Stage 2 of ``train_tiny_llava.py`` keeps the ViT frozen, so a run continued from the shipped model has
the shipped ViT bit for bit; only the projector and the language model need to travel.

    python scripts/llava_parts.py split runs/p8/E4/model parts/E4          # LM + projector in float16, JSON files
    python scripts/llava_parts.py join parts/E4 mmtoken/checkpoints/tiny-llava /tmp/E4   # a full model folder

``split`` writes ``lm.safetensors`` (every weight outside the vision tower, in float16) and copies the
folder's JSON files; ``join`` takes the vision tower from a second model folder and writes a loadable
``model.safetensors`` (float32 for the float16 parts and the vision tower alike). ``split`` checks
nothing about the ViT; ``join`` writes a new folder only, loads the result back and refuses one with
missing, unexpected or mis-shaped weights (removing what it wrote).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

VISION = ("vision_tower.", "model.vision_tower.")  # transformers saves the first; both are read


def split(src: str, dst: str) -> int:
    """Writes ``dst/lm.safetensors`` and the JSON files; returns the number of tensors written."""
    weights = load_file(os.path.join(src, "model.safetensors"))
    lm = {k: v.to(torch.float16).contiguous() for k, v in weights.items() if not k.startswith(VISION)}
    if len(lm) == len(weights):
        raise SystemExit(f"{src}/model.safetensors: no tensor named vision_tower.*; is it a LLaVA model?")
    os.makedirs(dst, exist_ok=True)
    save_file(lm, os.path.join(dst, "lm.safetensors"))
    for name in os.listdir(src):
        if name.endswith(".json") or name.endswith(".jinja"):
            shutil.copy(os.path.join(src, name), dst)
    return len(lm)


def join(parts: str, vision_from: str, dst: str) -> int:
    """Writes ``dst`` (a model folder) from ``parts`` and the vision tower of ``vision_from``; returns the
    number of tensors."""
    from transformers import LlavaForConditionalGeneration

    if os.path.exists(dst) and os.listdir(dst):
        raise SystemExit(f"{dst}: exists and is not empty; join writes a new model folder")
    lm = load_file(os.path.join(parts, "lm.safetensors"))
    vision = {k: v for k, v in load_file(os.path.join(vision_from, "model.safetensors")).items() if k.startswith(VISION)}
    os.makedirs(dst, exist_ok=True)
    full = {k: v.float().contiguous() for k, v in {**vision, **lm}.items()}
    save_file(full, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(parts):
        if name != "lm.safetensors":
            shutil.copy(os.path.join(parts, name), dst)
    try:
        _, info = LlavaForConditionalGeneration.from_pretrained(dst, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    except RuntimeError as e:  # a weight of the wrong shape: the message names it
        bad = {"error": " ".join(str(e).split())}
    if bad:
        shutil.rmtree(dst)
        raise SystemExit(f"{vision_from}/model.safetensors: its vision tower does not fit {parts}/config.json: {bad}")
    return len(full)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("split", help="model folder -> LM + projector in float16")
    s.add_argument("src")
    s.add_argument("dst")
    j = sub.add_parser("join", help="parts + a model folder's vision tower -> model folder")
    j.add_argument("parts")
    j.add_argument("vision_from")
    j.add_argument("dst")
    args = p.parse_args(argv)
    if args.cmd == "split":
        print(f"{split(args.src, args.dst)} tensors -> {args.dst}")
    else:
        print(f"{join(args.parts, args.vision_from, args.dst)} tensors -> {args.dst}")


if __name__ == "__main__":
    sys.exit(main())
