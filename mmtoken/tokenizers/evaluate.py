"""How good are a tokenizer's reconstructions, per number of tokens: PSNR, SSIM, and semantic fidelity
(a VQA model's accuracy on the reconstructions against its accuracy on the originals).

    mmtoken tokbench --tokenizer tiny-seed --model tiny-llava --limit 200 --out runs/tokbench
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per image, for images in [0, 1]."""
    mse = ((a.float() - b.float()) ** 2).mean(dim=(1, 2, 3)).clamp_min(1e-10)
    return 10 * torch.log10(1.0 / mse)


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Per image SSIM (Wang et al. 2004: Gaussian window 11 / 1.5, K1 0.01, K2 0.03, data range 1), the
    mean over channels and valid window positions."""
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = (g / g.sum())
    k = (g[:, None] * g[None, :]).expand(a.shape[1], 1, window, window).to(a.device)
    a, b = a.float(), b.float()

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, k, groups=x.shape[1])

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=(1, 2, 3))


def _images_to_pil(x: Tensor) -> list:
    from PIL import Image

    arr = (x.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def evaluate(tok: Any, lm: Any = None, limit: int = 200, steps: int = 25, batch: int = 50, progress: bool = True,
             guidance: float = 1.0) -> dict:
    """Rows per prefix length ``k`` (FlexTok: 1, 2, 4, ..., K; other tokenizers: K): PSNR and SSIM of the
    reconstructions of ``limit`` held-out synth-vqa images, and with ``lm`` its synth-vqa accuracy on them.
    Two references: the originals as the model sees them, and the originals after the tokenizer's own
    resolution (down- then up-sampled): the best any tokenizer of that resolution could do. ``guidance``
    (FlexTok): the classifier-free guidance scale of its decoder (1: none)."""
    from ..benchmarks.runner import answer_batch
    from ..benchmarks.tasks import TASKS

    items = TASKS["synth-vqa"].items(limit)
    size = tok.image_size
    full = [it.image for it in items]
    from .base import to_tensor

    x = to_tensor(full, size)
    ks = [2**i for i in range(tok.n_tokens.bit_length()) if 2**i <= tok.n_tokens] if tok.flexible_length else []
    if not ks or ks[-1] != tok.n_tokens:
        ks.append(tok.n_tokens)
    ids = torch.cat([tok.encode(x[i : i + batch]) for i in range(0, len(x), batch)])

    def accuracy(images: list) -> float:
        if lm is None:
            return float("nan")
        correct = 0
        for i in range(0, len(items), batch):
            chunk = [type(it)(**{**it.__dict__, "image": im}) for it, im in zip(items[i : i + batch], images[i : i + batch])]
            preds, _, _ = answer_batch(lm, chunk, 4, "cpu")
            correct += sum(p == it.answers[0] for p, it in zip(preds, chunk))
        return correct / len(items)

    model_size = lm.model.config.vision_config.image_size if lm is not None else size
    resized = [im.resize((size, size)).resize((model_size, model_size)) for im in full]
    rows = [{"k": 0, "label": "original", "accuracy": accuracy(full)},
            {"k": 0, "label": f"original at {size} px", "accuracy": accuracy(resized)}]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ks), desc="prefix lengths")
    for k in ks:
        extra = {"guidance": guidance} if guidance != 1.0 else {}
        rec = torch.cat([tok.decode(ids[i : i + batch, :k], steps=steps, **extra) for i in range(0, len(ids), batch)])
        pil = [im.resize((model_size, model_size)) for im in _images_to_pil(rec)]
        rows.append({"k": k, "label": f"{k} tokens", "psnr": float(psnr(rec, x).mean()), "ssim": float(ssim(rec, x).mean()),
                     "accuracy": accuracy(pil)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"rows": rows, "n": len(items), "codes_used": int(torch.unique(ids).numel()), "decode_steps": steps, "guidance": guidance}


def write(result: dict, out: str, title: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    lines = ["| tokens | PSNR dB | SSIM | synth-vqa accuracy |", "|---|---|---|---|"]
    for r in result["rows"]:
        p = f"{r['psnr']:.2f}" if "psnr" in r else ""
        s = f"{r['ssim']:.3f}" if "ssim" in r else ""
        lines.append(f"| {r['label']} | {p} | {s} | {r['accuracy']:.3f} |")
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    written = [os.path.join(out, "summary.json"), os.path.join(out, "summary.md")]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    rows = [r for r in result["rows"] if r["k"] > 0]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for ax, key, name in zip(axes, ("psnr", "ssim", "accuracy"), ("PSNR (dB)", "SSIM", "synth-vqa accuracy")):
        ax.plot([r["k"] for r in rows], [r[key] for r in rows], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_title(name)
        if key == "accuracy":
            for r, style in zip(result["rows"][:2], ("--", ":")):
                ax.axhline(r["accuracy"], linestyle=style, color="grey", label=r["label"])
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = os.path.join(out, "tokbench.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return written + [path]
