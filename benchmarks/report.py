"""Tables (CSV, Markdown) and Pareto plots of a bench summary."""

from __future__ import annotations

import csv
import os
from typing import Any

COLUMNS = ["model", "task", "method", "n", "score", "agreement", "kl", "visual_tokens", "prefill_s",
           "oracle_prefill_s", "decode_s_per_token", "peak_mem_bytes", "prefill_flops"]


def flat(row: dict[str, Any]) -> dict[str, Any]:
    m = row.get("metrics", {})
    return {
        "model": row["model"], "task": row["task"], "method": row["method"], "n": row["n"],
        "score": m.get("score"), "agreement": m.get("agreement"), "kl": m.get("kl"),
        "visual_tokens": row.get("visual_tokens"), "prefill_s": row.get("prefill_s"),
        "oracle_prefill_s": row.get("oracle_prefill_s"), "decode_s_per_token": row.get("decode_s_per_token"),
        "peak_mem_bytes": row.get("peak_mem_bytes"), "prefill_flops": row.get("prefill_flops"),
    }


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if abs(v) >= 1e6:
            return f"{v:.3g}"
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def markdown(summary: dict) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in summary["rows"]:
        f = flat(row)
        lines.append("| " + " | ".join(_fmt(f[c]) if c != "method" else f"`{f[c]}`" for c in COLUMNS) + " |")
    return "\n".join(lines)


def write_tables(summary: dict, out: str) -> None:
    with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for row in summary["rows"]:
            w.writerow(flat(row))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(summary) + "\n")


ORIG_POS = " (orig. pos.)"


def family(method: str) -> str:
    """``"tome:keep=0.5+fastv:k=2"`` -> ``"tome+fastv"``: the curve a row belongs to; rows with
    ``positions=original`` form their own curve (``"tome (orig. pos.)"``)."""
    name = "+".join(part.split(":")[0] for part in method.split("+"))
    return name + ORIG_POS if "positions=original" in method else name


def plot_pareto(summary: dict, out: str) -> list[str]:
    """One figure per (model, task): score vs visual tokens and vs prefill time. Returns the files written
    (none when matplotlib is missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in summary["rows"]:
        groups.setdefault((row["model"], row["task"]), []).append(row)
    files = []
    for (model, task), rows in groups.items():
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.6))
        plugins: dict[str, list[dict]] = {}
        for r in rows:
            plugins.setdefault(family(r["method"]), []).append(r)
        # one colour per method, shared by its two position-id curves; original ids dashed, square markers
        bases = sorted({name.removesuffix(ORIG_POS) for name in plugins})
        cmap = plt.get_cmap("tab20" if len(bases) > 10 else "tab10")
        colour = {b: cmap(i % cmap.N) for i, b in enumerate(bases)}
        for name, rs in sorted(plugins.items()):
            rs = sorted(rs, key=lambda r: r["visual_tokens"])
            xs = [r["visual_tokens"] for r in rs]
            ys = [r["metrics"].get("score") for r in rs]
            orig = name.endswith(ORIG_POS)
            style = {"color": colour[name.removesuffix(ORIG_POS)], "marker": "s" if orig else "o",
                     "linestyle": "--" if orig else "-", "label": name}
            axes[0].plot(xs, ys, **style)
            if all(r.get("prefill_s") is not None for r in rs):
                axes[1].plot([r["prefill_s"] * 1000 for r in rs], ys, **style)
        axes[0].set_xlabel("visual tokens entering the LLM (mean over layers)")
        axes[1].set_xlabel("prefill latency (ms, batch)")
        for ax in axes:
            ax.set_ylabel("score")
            ax.grid(alpha=0.3)
        axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        fig.suptitle(f"{model} / {task}")
        fig.tight_layout()
        path = os.path.join(out, f"pareto_{model.replace('/', '_')}_{task}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
