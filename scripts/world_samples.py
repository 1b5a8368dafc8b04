"""Render sheets of held-out synthetic images with one question each: docs/img/world_samples.png (synth-vqa)
and docs/img/world_large_samples.png (synth-hires, synth-doc)."""

from __future__ import annotations

import os
import sys

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmtoken.world import get_task, render  # noqa: E402


def sheet_of(samples, out: str, size: int = 192) -> None:
    n = len(samples)
    pad = 46
    sheet = Image.new("RGB", (size * 4, (size + pad) * ((n + 3) // 4)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, s in enumerate(samples):
        x, y = (i % 4) * size, (i // 4) * (size + pad)
        sheet.paste(render(s.scene, size), (x, y))
        q = s.question
        draw.text((x + 4, y + size + 2), q[:34], fill="black")
        draw.text((x + 4, y + size + 14), q[34:68], fill="black")
        draw.text((x + 4, y + size + 28), f"-> {s.answers[0]}", fill=(0, 90, 0))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    sheet.save(out, optimize=True)
    print(out)


def main() -> None:
    sheet_of(get_task("synth-vqa").samples("test", 8), "docs/img/world_samples.png")
    sheet_of(get_task("synth-hires").samples("test", 4) + get_task("synth-doc").samples("test", 4), "docs/img/world_large_samples.png")


if __name__ == "__main__":
    main()
