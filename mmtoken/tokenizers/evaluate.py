"""How good are a tokenizer's reconstructions, per number of tokens: PSNR, SSIM, and semantic fidelity
(a VQA model's accuracy on the reconstructions against its accuracy on the originals).

    mmtoken tokbench --tokenizer tiny-seed --model tiny-llava --limit 200 --out runs/tokbench
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

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


def check_decoding(tok: Any, guidance: float, seeds: Sequence[int], norm_guidance: bool = False) -> None:
    """Raise ``ValueError`` unless ``seeds`` are one or more distinct decoding seeds, guidance and seeds
    other than the defaults (1, seed 0) go to a tokenizer that takes them (FlexTok), and
    ``norm_guidance`` comes with a guidance scale."""
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: give one or more distinct decoding seeds, got {seeds}")
    if not tok.flexible_length and (guidance != 1.0 or seeds != [0] or norm_guidance):
        raise ValueError(f"guidance (--guidance, --norm-guidance) and decoding seeds (--seeds) apply to FlexTok "
                         f"tokenizers, not to a {tok.kind} tokenizer")
    if norm_guidance and guidance == 1.0:
        raise ValueError("norm guidance (--norm-guidance, APG) shapes classifier-free guidance: give a guidance scale "
                         "other than 1 (--guidance)")


def evaluate(tok: Any, lm: Any = None, limit: int = 200, steps: int = 25, batch: int = 50, progress: bool = True,
             guidance: float = 1.0, seeds: Sequence[int] = (0,), norm_guidance: bool = False) -> dict:
    """Rows per prefix length ``k`` (FlexTok: 1, 2, 4, ..., K; other tokenizers: K): PSNR and SSIM of the
    reconstructions of ``limit`` held-out synth-vqa images, and with ``lm`` its synth-vqa accuracy on them,
    overall and per question family. Two references: the originals as the model sees them, and the
    originals after the tokenizer's own resolution (down- then up-sampled): the best any tokenizer of that
    resolution could do. FlexTok only: ``guidance`` is the classifier-free guidance scale of its decoder (1:
    none), applied in its APG form with ``norm_guidance``; ``seeds`` are decoding seeds (each ``batch`` of images is decoded from the noise of that seed),
    and a row reports the mean over them, with each seed's figures under ``per_seed`` when there are
    several."""
    from ..benchmarks.runner import answer_batch
    from ..benchmarks.tasks import TASKS

    check_decoding(tok, guidance, seeds, norm_guidance)
    seeds = list(seeds)
    items = TASKS["synth-vqa"].items(limit)
    size = tok.image_size
    full = [it.image for it in items]
    from .base import to_tensor

    x = to_tensor(full, size)
    ks = [2**i for i in range(tok.n_tokens.bit_length()) if 2**i <= tok.n_tokens] if tok.flexible_length else []
    if not ks or ks[-1] != tok.n_tokens:
        ks.append(tok.n_tokens)
    ids = torch.cat([tok.encode(x[i : i + batch]) for i in range(0, len(x), batch)])
    family = [it.meta.get("family", "") for it in items]

    def accuracy(images: list) -> tuple[float, dict[str, float]]:
        if lm is None:
            return float("nan"), {}
        right = []
        for i in range(0, len(items), batch):
            chunk = [type(it)(**{**it.__dict__, "image": im}) for it, im in zip(items[i : i + batch], images[i : i + batch])]
            preds, _, _ = answer_batch(lm, chunk, 4, "cpu")
            right += [p == it.answers[0] for p, it in zip(preds, chunk)]
        per = {f: sum(r for r, g in zip(right, family) if g == f) / family.count(f) for f in sorted(set(family))}
        return sum(right) / len(items), per

    def row(k: int, label: str, measured: list[dict]) -> dict:
        out = {"k": k, "label": label}
        for key in ("psnr", "ssim", "accuracy"):
            if key in measured[0]:
                out[key] = sum(m[key] for m in measured) / len(measured)
        out["families"] = {f: sum(m["families"][f] for m in measured) / len(measured) for f in measured[0]["families"]}
        if len(measured) > 1:
            out["per_seed"] = measured
        return out

    model_size = lm.model.config.vision_config.image_size if lm is not None else size
    resized = [im.resize((size, size)).resize((model_size, model_size)) for im in full]
    rows = []
    for label, images in (("original", full), (f"original at {size} px", resized)):
        acc, fam = accuracy(images)
        rows.append(row(0, label, [{"accuracy": acc, "families": fam}]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ks) * len(seeds), desc="prefix lengths x seeds")
    extra = {"guidance": guidance, "norm_guidance": norm_guidance} if guidance != 1.0 else {}
    for k in ks:
        measured = []
        for seed in seeds:
            kw = {"seed": seed, **extra} if tok.flexible_length else {}
            rec = torch.cat([tok.decode(ids[i : i + batch, :k], steps=steps, **kw) for i in range(0, len(ids), batch)])
            pil = [im.resize((model_size, model_size)) for im in _images_to_pil(rec)]
            acc, fam = accuracy(pil)
            measured.append({"seed": seed, "psnr": float(psnr(rec, x).mean()), "ssim": float(ssim(rec, x).mean()),
                             "accuracy": acc, "families": fam})
            if bar is not None:
                bar.update(1)
        rows.append(row(k, f"{k} tokens", measured))
    if bar is not None:
        bar.close()
    return {"rows": rows, "n": len(items), "codes_used": int(torch.unique(ids).numel()), "decode_steps": steps,
            "guidance": guidance, "norm_guidance": norm_guidance, "seeds": seeds,
            "flexible_length": bool(tok.flexible_length)}


def write(result: dict, out: str, title: str) -> list[str]:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(result, f, indent=1)
    several = len(result.get("seeds", [0])) > 1
    mean = " (mean over seeds)" if several else ""
    lines = [f"| tokens | PSNR dB{mean} | SSIM{mean} | synth-vqa accuracy{mean} |" + (" accuracy per seed |" if several else ""),
             "|---|---|---|---|" + ("---|" if several else "")]
    for r in result["rows"]:
        p = f"{r['psnr']:.2f}" if "psnr" in r else ""
        s = f"{r['ssim']:.3f}" if "ssim" in r else ""
        per = ""
        if several:
            per = " " + ", ".join(f"{m['accuracy']:.3f}" for m in r["per_seed"]) + " |" if "per_seed" in r else " |"
        lines.append(f"| {r['label']} | {p} | {s} | {r['accuracy']:.3f} |" + per)
    if result.get("flexible_length"):
        apg = " (APG)" if result.get("norm_guidance") else ""
        lines += ["", f"Decoding: {result['decode_steps']} Euler steps, guidance {result['guidance']:g}{apg}, "
                  f"seed{'s' if several else ''} {', '.join(str(v) for v in result['seeds'])}."]
    families = list(result["rows"][0].get("families", {}))
    if families:
        shown = [r for r in result["rows"] if r["label"] != result["rows"][1]["label"]]
        lines += ["", "Per question family" + mean + ":", "",
                  "| family | " + " | ".join(r["label"] for r in shown) + " |", "|---|" + "---|" * len(shown)]
        for f in families:
            lines.append(f"| {f} | " + " | ".join(f"{r['families'][f]:.3f}" for r in shown) + " |")
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
