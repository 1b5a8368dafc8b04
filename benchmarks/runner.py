"""``mmtoken bench``: accuracy, fidelity and speed of methods on tasks, resumable and shardable.

For every (model, task, method) row the runner

1. answers the task's items in batches with greedy decoding, appending one JSON line per sample to
   ``OUT/samples/<model>/<task>/<method>.jsonl`` as it goes (a restarted run skips the samples already
   written: nothing is lost or duplicated);
2. aggregates the task's metrics, plus fidelity to the uncompressed model (``none``, always run first):
   ``agreement`` (share of identical answers) and ``kl`` (mean KL divergence of the first answer token's
   distribution from the uncompressed one, over the reference's top-256 tokens plus one bucket for the
   rest — exact for vocabularies of 256 tokens or fewer);
3. measures speed on one fixed batch (:mod:`mmtoken.benchmarks.speed`): prefill, decode per token,
   peak memory, analytic FLOPs, and the same prefill for the row's **oracle** (the model simply fed the
   same numbers of visual tokens, no selection cost).

Under ``accelerate launch`` each process answers every ``world``-th sample and writes its own part;
process 0 merges the parts, measures speed and writes ``summary.json`` (``{"rows": [...], "env": {...}}``),
``summary.csv`` and ``summary.md``, and the Pareto plots.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch

import mmtoken
from mmtoken.models import LoadedModel, load_model

from . import speed
from .tasks import BenchTask, Item, get_bench_task

TOPK = 256


@dataclass
class RunConfig:
    models: list[str]
    tasks: list[str]
    methods: list[str]
    out: str
    limit: int | None = None
    batch_size: int = 16
    device: str = "cpu"
    dtype: str = "float32"
    data: str | None = None
    seed: int = 0
    speed: bool = True
    speed_repeats: int = 5
    command: str = ""
    progress: bool = True
    # more (model, tasks, methods, limit) grids run after models x tasks x methods, into the same summary
    extra: list[tuple[str, list[str], list[str], int | None]] = field(default_factory=list)


def expand_methods(methods: list[str]) -> list[str]:
    """Expand sweeps: ``fastv:k=2,keep=0.75,0.5`` -> ``fastv:k=2,keep=0.75`` and ``fastv:k=2,keep=0.5``
    (a bare value continues the previous parameter). ``none`` stays as is."""
    out: list[str] = []
    for spec in methods:
        if spec == "none":
            out.append(spec)
            continue
        expanded = [""]
        for part in spec.split("+"):
            name, sep, rest = part.partition(":")
            options: list[list[str]] = []
            if sep:
                for item in rest.split(","):
                    if "=" in item:
                        options.append([item.strip()])
                    elif options:
                        key = options[-1][0].split("=")[0]
                        options[-1].append(f"{key}={item.strip()}")
                    else:
                        raise mmtoken.SpecError(f"malformed spec {spec!r}: {item!r} before any key=value")
            combos = [[]]
            for opts in options:
                combos = [c + [o] for c in combos for o in opts]
            variants = [name + (":" + ",".join(c) if c else "") for c in combos]
            expanded = [e + ("+" if e else "") + v for e in expanded for v in variants]
        out.extend(expanded)
    if "none" in out:
        out.remove("none")
    return ["none"] + out


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", text).strip("_") or "x"


# ---------------------------------------------------------------------------------------------------
# distributed helpers (accelerate is optional)


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    state: Any = None

    def barrier(self) -> None:
        if self.state is not None and self.world > 1:
            self.state.wait_for_everyone()


def get_dist() -> Dist:
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    try:
        from accelerate import PartialState
    except ImportError as exc:  # pragma: no cover - only under a launcher without accelerate
        raise mmtoken.MmtokenError("a multi-process launch needs `pip install accelerate`") from exc
    state = PartialState(cpu=True) if not torch.cuda.is_available() else PartialState()
    return Dist(rank=state.process_index, world=state.num_processes, state=state)


# ---------------------------------------------------------------------------------------------------


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    if not os.path.exists(path):
        return rows
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a crash: everything after it is redone
    return rows


def _batches(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, file=sys.stderr)


def prepare_inputs(lm: LoadedModel, items: list[Item], device: str) -> dict:
    texts = [lm.format(it.question + (" " + it.instruction if it.instruction else ""), it.image is not None) for it in items]
    images = [it.image for it in items if it.image is not None]
    kw = {"text": texts, "return_tensors": "pt", "padding": True}
    if images:
        kw["images"] = images
    inputs = lm.processor(**kw)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}


def answer_batch(lm: LoadedModel, items: list[Item], max_new_tokens: int, device: str) -> tuple[list[str], torch.Tensor, list[int]]:
    """Answers (greedy unless a decode-stage method says otherwise), first-token log-probabilities ``[B, V]`` and visual tokens entering the LLM per sample."""
    inputs = prepare_inputs(lm, items, device)
    model = lm.model
    handle = getattr(model, "_mmtoken_handle", None)
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True)
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    tok = lm.processor.tokenizer
    preds = [tok.decode(row, skip_special_tokens=True).strip() for row in new]
    first = out.logits[0].float()
    if first.shape[0] != len(items):  # beam search: the beams of a sample are consecutive rows
        first = first[:: first.shape[0] // len(items)]
    first = torch.log_softmax(first, dim=-1)
    if handle is not None and handle.stats.image_tokens_out:
        per_image = handle.stats.image_tokens_out
    else:
        per_image = [int(x) for x in (inputs["input_ids"] == model.config.image_token_id).sum(-1)]
    visual = _visual_per_sample(inputs, model, per_image, handle)
    return preds, first, visual


def visual_per_layer(model: torch.nn.Module, n: int) -> list[list[int] | None]:
    """Per sample of the last forward pass, the visual tokens entering each LLM layer (None: unpatched)."""
    handle = getattr(model, "_mmtoken_handle", None)
    layers = handle.stats.llm_visual_tokens if handle is not None else {}
    rows = _sample_rows(len(next(iter(layers.values()))), n) if layers else None
    if rows is None:
        return [None] * n
    return [[layers[l][i] for l in sorted(layers)] for i in rows]


def _sample_rows(b: int, n: int) -> list[int] | None:
    """Rows of a forward pass of ``b`` rows that stand for the ``n`` samples (beam search: each sample's
    first beam); None when they cannot be told (a decoder that prefills sample by sample)."""
    if b == n:
        return list(range(n))
    if b % n == 0:
        return list(range(0, b, b // n))
    return None


def _visual_per_sample(inputs: dict, model: torch.nn.Module, per_image: list[int], handle: Any) -> list[int]:
    """Mean over LLM layers of the visual tokens each sample carries (the budget a method really spent)."""
    layers = handle.stats.llm_visual_tokens if handle is not None else {}
    rows = _sample_rows(len(next(iter(layers.values()))), inputs["input_ids"].shape[0]) if layers else None
    if rows is not None:
        return [sum(layers[l][i] for l in layers) / len(layers) for i in rows]
    return [int(x) for x in (inputs["input_ids"] == model.config.image_token_id).sum(-1)]


def _kl(ref: dict, logp: torch.Tensor) -> float:
    """KL(ref || logp) over ref's top tokens plus one bucket for the remaining mass."""
    logp = logp.detach().float().cpu()
    ids = torch.tensor(ref["ids"])
    p = torch.tensor(ref["logp"]).exp()
    q = logp[ids].exp()
    rest_p = max(0.0, 1.0 - float(p.sum()))
    rest_q = max(1e-12, 1.0 - float(q.sum()))
    kl = float((p * (torch.log(p.clamp_min(1e-12)) - torch.log(q.clamp_min(1e-12)))).sum())
    if rest_p > 1e-9:
        kl += rest_p * (math.log(rest_p) - math.log(rest_q))
    return max(0.0, kl)


def run_row(lm: LoadedModel, task: BenchTask, method: str, cfg: RunConfig, dist: Dist, reference: dict[str, dict] | None) -> list[dict]:
    """Answer every item of ``task`` under ``method``; returns the per-sample rows of all processes."""
    base = os.path.join(cfg.out, "samples", slug(lm.name), slug(task.name))
    os.makedirs(base, exist_ok=True)
    path = os.path.join(base, f"{slug(method)}.rank{dist.rank}.jsonl" if dist.world > 1 else f"{slug(method)}.jsonl")
    items = task.items(cfg.limit)
    mine = items[dist.rank :: dist.world]
    done = {r["item_id"] for r in _read_jsonl(path)}
    _truncate_partial_line(path)
    todo = [it for it in mine if it.id not in done]
    bar = _progress(len(mine), f"{task.name} {method}", cfg.progress and dist.rank == 0)
    if bar is not None:
        bar.update(len(mine) - len(todo))
    handle = mmtoken.apply(lm.model, method) if method != "none" else None
    try:
        with open(path, "a") as f:
            for batch in _batches(todo, cfg.batch_size):
                preds, first, visual = answer_batch(lm, batch, task.max_new_tokens, cfg.device)
                per_layers = visual_per_layer(lm.model, len(batch))
                for it, pred, lp, vis, per_layer in zip(batch, preds, first, visual, per_layers):
                    top = torch.topk(lp, min(TOPK, lp.numel()))
                    row = {
                        "item_id": it.id, "prediction": pred, "answers": it.answers, "meta": it.meta,
                        "scores": task.per_sample(it, pred), "visual_tokens": vis, "visual_per_layer": per_layer,
                        "first_top": {"ids": top.indices.tolist(), "logp": [round(v, 5) for v in top.values.tolist()]},
                    }
                    if reference is not None and it.id in reference:
                        ref = reference[it.id]
                        row["agree"] = float(pred == ref["prediction"])
                        row["kl"] = _kl(ref["first_top"], lp)
                    f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())
                if bar is not None:
                    bar.update(len(batch))
    finally:
        if handle is not None:
            handle.remove()
        if bar is not None:
            bar.close()
    dist.barrier()
    rows: list[dict] = []
    if dist.world > 1:
        for r in range(dist.world):
            rows.extend(_read_jsonl(os.path.join(base, f"{slug(method)}.rank{r}.jsonl")))
    else:
        rows = _read_jsonl(path)
    order = {it.id: i for i, it in enumerate(items)}
    seen, unique = set(), []
    for r in sorted(rows, key=lambda r: order.get(r["item_id"], 1 << 60)):
        if r["item_id"] in order and r["item_id"] not in seen:
            seen.add(r["item_id"])
            unique.append(r)
    return unique


def model_fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's configuration and weights (to refuse resuming a run with another model)."""
    import hashlib

    h = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check_same_model(cfg: RunConfig, model_name: str, model: torch.nn.Module, dist: Dist) -> None:
    """Samples already in ``cfg.out`` must come from this very model (same config and weights)."""
    folder = os.path.join(cfg.out, "samples", slug(model_name))
    path = os.path.join(folder, "model.json")
    fp = model_fingerprint(model)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f).get("fingerprint")
        if stored != fp:
            raise mmtoken.MmtokenError(
                f"{folder} holds samples of a different {model_name!r} (other weights or configuration); "
                "pass a fresh --out, or delete that folder to start over"
            )
        return
    if dist.rank == 0:
        os.makedirs(folder, exist_ok=True)
        with open(path, "w") as f:
            json.dump({"model": model_name, "fingerprint": fp}, f)


def _truncate_partial_line(path: str) -> None:
    """Drop a last line cut short by a crash, so appending continues on a line boundary."""
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _flops_over_all_samples(row: dict, rows: list[dict], config: Any) -> None:
    """Methods whose token counts differ per sample (e.g. visual-token exit): recompute the analytic
    FLOPs from every evaluated sample's per-layer visual tokens instead of the speed batch's."""
    per = [r["visual_per_layer"] for r in rows if r.get("visual_per_layer")]
    if len(per) != len(rows) or not per or "text_tokens" not in row:
        return
    mean = [sum(p[l] for p in per) / len(per) for l in range(len(per[0]))]
    row.update(speed.flop_counts(config, row["text_tokens"], mean))


def exit_layer_histogram(rows: list[dict]) -> dict[str, int] | None:
    """For methods after which no visual token is left in some layers (visual-token exit): how many samples
    lost their last visual token before each LLM layer (``"none"``: kept some to the end). None when no
    sample exits."""
    hist: dict[str, int] = {}
    for r in rows:
        per_layer = r.get("visual_per_layer")
        if not per_layer or not per_layer[0]:
            continue
        layer = next((str(l) for l, n in enumerate(per_layer) if n == 0), "none")
        hist[layer] = hist.get(layer, 0) + 1
    if set(hist) <= {"none"}:
        return None
    return dict(sorted(hist.items(), key=lambda kv: (kv[0] == "none", int(kv[0]) if kv[0] != "none" else 0)))


def summarize(rows: list[dict], task: BenchTask) -> dict[str, float]:
    metrics = task.aggregate(rows)
    if rows and "agree" in rows[0]:
        metrics["agreement"] = sum(r["agree"] for r in rows) / len(rows)
        metrics["kl"] = sum(r["kl"] for r in rows) / len(rows)
    return metrics


def environment(cfg: RunConfig) -> dict[str, Any]:
    import transformers

    return {
        "mmtoken": mmtoken.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "platform": platform.platform(), "device": cfg.device,
        "device_name": torch.cuda.get_device_name() if cfg.device.startswith("cuda") else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "command": cfg.command, "dtype": cfg.dtype,
    }


def run(cfg: RunConfig) -> dict:
    """Run every row; returns the summary (also written to ``cfg.out``)."""
    dist = get_dist()
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.out, exist_ok=True)
    methods = expand_methods(cfg.methods)
    for m in methods:
        if m != "none":
            mmtoken.plugin.build_plugins(m)  # fail fast on a bad spec, before any work
    tasks = [get_bench_task(t, cfg.data) for t in cfg.tasks]
    grids = [(m, tasks, methods, cfg.limit) for m in cfg.models]
    for model_name, task_names, grid_methods, limit in cfg.extra:  # validated before any work too
        grid_methods = expand_methods(grid_methods)
        for m in grid_methods:
            if m != "none":
                mmtoken.plugin.build_plugins(m)
        grids.append((model_name, [get_bench_task(t, cfg.data) for t in task_names], grid_methods, limit))
    summary_rows: list[dict] = []
    for model_name, grid_tasks, grid_methods, limit in grids:
        _run_grid(replace(cfg, limit=limit), model_name, grid_tasks, grid_methods, dist, summary_rows)
    dist.barrier()
    return {"rows": summary_rows, "env": environment(cfg)}


def _run_grid(cfg: RunConfig, model_name: str, tasks: list[BenchTask], methods: list[str], dist: Dist, summary_rows: list[dict]) -> None:
    """Every task x method row of one model, appended to ``summary_rows`` (the summary is rewritten after each)."""
    lm = load_model(model_name, device=cfg.device, dtype=cfg.dtype)
    _check_same_model(cfg, model_name, lm.model, dist)
    for task in tasks:
        reference: dict[str, dict] | None = None
        for method in methods:
            t0 = time.time()
            rows = run_row(lm, task, method, cfg, dist, reference)
            if method == "none":
                reference = {r["item_id"]: r for r in rows}
            if dist.rank != 0:
                continue
            row = {
                "model": model_name, "task": task.name, "method": method,
                "params": _params(method), "n": len(rows), "metrics": summarize(rows, task),
                "visual_tokens": sum(r["visual_tokens"] for r in rows) / max(1, len(rows)),
                "eval_s": time.time() - t0,
            }
            exits = exit_layer_histogram(rows)
            if exits:
                row["exit_layers"] = exits
            if cfg.speed:
                items = task.items(cfg.limit)[: cfg.batch_size]
                row.update(speed.measure(lm, items, method, task.max_new_tokens, cfg.device, repeats=cfg.speed_repeats))
                _flops_over_all_samples(row, rows, lm.model.config)
            summary_rows.append(row)
            _write_summary(cfg, summary_rows)


def _params(method: str) -> dict:
    if method == "none":
        return {}
    return {p.name: p.config.to_dict() for p in mmtoken.plugin.build_plugins(method)}


def _write_summary(cfg: RunConfig, rows: list[dict]) -> None:
    from . import report

    summary = {"rows": rows, "env": environment(cfg)}
    tmp = os.path.join(cfg.out, "summary.json.tmp")
    with open(tmp, "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(tmp, os.path.join(cfg.out, "summary.json"))
    report.write_tables(summary, cfg.out)
