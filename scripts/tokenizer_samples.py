"""Sheet of held-out scenes and their reconstructions by a tokenizer: one row per scene, the original
first, then the decoded images (a FlexTok: every prefix length 1, 2, 4, ..., K).

    python scripts/tokenizer_samples.py --tokenizer tiny-flextok --out docs/img/tiny_flextok_prefixes.png
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mmtoken.tokenizers as T  # noqa: E402
from mmtoken.tokenizers.base import to_tensor  # noqa: E402
from mmtoken.world import get_task, render  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", default="tiny-flextok")
    ap.add_argument("--out", default="docs/img/tiny_flextok_prefixes.png")
    ap.add_argument("--n", type=int, default=6, help="held-out synth-vqa scenes (rows)")
    ap.add_argument("--size", type=int, default=96, help="pixels per cell")
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args(argv)
    tok = T.load(args.tokenizer)
    samples = get_task("synth-vqa").samples("test", args.n)
    originals = [render(s.scene, tok.image_size) for s in samples]
    ids = tok.encode(to_tensor(originals, tok.image_size))
    ks = [2**i for i in range(tok.n_tokens.bit_length()) if 2**i <= tok.n_tokens] if tok.flexible_length else [tok.n_tokens]
    columns = [("original", originals)]
    for k in ks:
        kwargs = {"steps": args.steps} if tok.flexible_length else {}
        rec = (tok.decode(ids[:, :k], **kwargs).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        columns.append((f"k = {k}", [Image.fromarray(a) for a in rec]))
    s, top = args.size, 16
    sheet = Image.new("RGB", (s * len(columns), top + s * len(samples)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (label, images) in enumerate(columns):
        draw.text((c * s + 4, 2), label, fill="black")
        for r, im in enumerate(images):
            sheet.paste(im.resize((s, s), Image.NEAREST), (c * s, top + r * s))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    sheet.save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    with torch.no_grad():
        main()
