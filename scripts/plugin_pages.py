"""Write docs/plugins/<name>.md for every built-in plugin from a bench summary.

Each page: the plugin's docstring (algorithm, parameters, choices), then its measured rows beside the
baselines at equal budgets, from ``summary.json`` of the command written on the page.

    mmtoken bench --out runs/default && python scripts/plugin_pages.py runs/default/summary.json [more summaries]

With several summaries (e.g. the default run and a tiny-llava-next run on synth-hires / synth-doc), each
page gets one measured block per run that holds the plugin.
"""

from __future__ import annotations

import inspect
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmtoken.benchmarks.report import ORIG_POS, family  # noqa: E402
from mmtoken.plugin import plugin_registry  # noqa: E402

BASELINES = {"none", "random", "pool", "visionzip", "fastv"}
# pages written from their own runs (other tasks, decoding methods): see each page's command
OWN_PAGES = {"opera", "greedy", "beam", "dyvte"}


def table(rows: list[dict]) -> str:
    out = ["| task | method | score | agreement | visual tokens | prefill ms | oracle prefill ms | plugin / oracle |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["metrics"]
        p, o = r.get("prefill_s"), r.get("oracle_prefill_s")
        ratio = f"{p / o:.2f}" if p and o else ""
        agree = f"{m['agreement']:.3f}" if "agreement" in m else ""
        pre = f"{p * 1e3:.1f}" if p else ""
        ora = f"{o * 1e3:.1f}" if o else ""
        out.append(f"| {r['task']} | `{r['method']}` | {m['score']:.3f} | {agree} | {r['visual_tokens']:.1f} | {pre} | {ora} | {ratio} |")
    return "\n".join(out)


def measured(name: str, summary: dict) -> list[str]:
    """The page lines for one run: how to reproduce it, the plugin's rows and the baselines beside them."""
    rows = summary["rows"]
    plain = lambda r: family(r["method"]).removesuffix(ORIG_POS)  # noqa: E731
    mine = [r for r in rows if name in plain(r).split("+")]
    if not mine:
        return []
    others = [r for r in rows if plain(r) in BASELINES - {name}]
    env = summary["env"]
    return [f"Model `{mine[0]['model']}`, {env.get('device_name') or env.get('device')}, torch {env['torch']}, "
            f"{env['threads']} threads. Reproduce with:", "", "```bash", env.get("command") or "mmtoken bench", "```", "",
            table(mine), "", "Baselines in the same run:", "", table(others), ""]


def main(*summary_paths: str, out_dir: str = "docs/plugins") -> None:
    summaries = [json.load(open(p)) for p in summary_paths]
    os.makedirs(out_dir, exist_ok=True)
    for name, cls in sorted(plugin_registry().items()):
        if name.startswith("oracle") or name in OWN_PAGES:
            continue
        doc = inspect.getdoc(sys.modules[cls.__module__]) or ""
        page = [f"# `{name}`", "", doc, "", "## Measured", ""]
        blocks = [measured(name, s) for s in summaries]
        for block in blocks:
            page += block
        if any(blocks):
            page += ["`plugin / oracle` is the plugin's prefill time over its oracle's (the model simply fed the same "
                     "visual tokens): its own overhead. `agreement`: share of answers identical to the uncompressed model's.", ""]
        else:
            page += ["Not in these runs' summaries.", ""]
        with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
            f.write("\n".join(page))
        print(os.path.join(out_dir, f"{name}.md"))


if __name__ == "__main__":
    main(*sys.argv[1:])
