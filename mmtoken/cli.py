"""The ``mmtoken`` command line: ``list``, ``demo``, ``prefill``, ``bench``, ``profile``."""

from __future__ import annotations

import argparse
import sys

import torch


def _cmd_list(args: argparse.Namespace) -> int:
    from .adapters import supported_model_classes
    from .plugin import plugin_registry

    print("plugins:")
    for name, cls in sorted(plugin_registry().items()):
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        print(f"  {name:<12} [{', '.join(cls.stages)}]  {doc[0] if doc else ''}")
        if args.verbose:
            for pname, tp, default, pdoc in cls.Config.describe():
                print(f"      {pname}: {tp} = {default!r}  {pdoc}")
    print("models:")
    for name in supported_model_classes():
        print(f"  {name}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    """Patch a small random LLaVA with each baseline, run prefill + greedy decoding, print what changed."""
    import time

    import mmtoken
    from .testing import make_batch, tiny_llava

    torch.manual_seed(0)
    model = tiny_llava(image_size=112, patch_size=8, vision_layers=4, text_layers=6)
    batch = make_batch(model, args.batch_size, seed=0)
    specs = ["none", "random:keep=0.25", "pool:stride=2", "visionzip:keep=0.25", "fastv:k=2,keep=0.25",
             "tome:keep=0.25", "tome:keep=0.5+fastv:k=2,keep=0.5"]
    with torch.inference_mode():
        ref = model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    n_in = int((batch["input_ids"] == model.config.image_token_id).sum(-1)[0])
    print(f"random LLaVA-1.5-shaped model, {n_in} visual tokens per image, batch {args.batch_size}")
    print(f"{'method':<36} {'visual tokens per LLM layer':<34} {'agreement':>9} {'seconds':>8}")
    for spec in specs:
        handle = mmtoken.apply(model, spec) if spec != "none" else None
        try:
            with torch.inference_mode():
                t0 = time.perf_counter()
                out = model.generate(**batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
                dt = time.perf_counter() - t0
            if handle is not None:
                counts = handle.stats.llm_visual_tokens
                per_layer = "/".join(str(counts[i][0]) for i in sorted(counts))
            else:
                per_layer = "/".join([str(n_in)] * model.config.text_config.num_hidden_layers)
        finally:
            if handle is not None:
                handle.remove()
        agree = (out[:, -args.new_tokens:] == ref[:, -args.new_tokens:]).float().mean().item()
        print(f"{spec:<36} {per_layer:<34} {agree:>9.2f} {dt:>8.3f}")
    print("agreement: share of generated tokens equal to the uncompressed model's (random weights: a plumbing check, not accuracy)")
    return 0


def _cmd_prefill(args: argparse.Namespace) -> int:
    from .benchmarks import prefill

    torch.set_num_threads(args.threads) if args.threads else None
    rows = prefill.run(keep=args.keep, batch_size=args.batch_size, size=args.size, warmup=args.warmup, repeats=args.repeats)
    print(f"prefill, random LLaVA-1.5-shaped model ({args.size}), batch {args.batch_size}, keep {args.keep}, "
          f"median of {args.repeats} after {args.warmup} warm-up, {torch.get_num_threads()} threads")
    print(prefill.format_table(rows))
    return 0


DEFAULT_METHODS = [
    "none", "random:keep=0.5,0.25,0.11", "pool:stride=2,3", "visionzip:keep=0.5,0.25,0.11",
    "fastv:k=2,keep=0.5,0.25,0.11", "tome:keep=0.5,0.25", "turbo:keep=0.5,0.25", "globalcom2:keep=0.5,0.25,0.11",
    "corrcomp", "corrcomp:keep=0.25", "vmtc:keep=0.25,0.11", "dyvte", "fastv:k=2,keep=0.5+dyvte",
    # the same shortening with the kept tokens' original position ids (see docs/results.md)
    "random:keep=0.25,positions=original", "pool:stride=2,positions=original", "visionzip:keep=0.25,positions=original",
    "tome:keep=0.25,positions=original", "turbo:keep=0.33,0.25,positions=original", "globalcom2:keep=0.25,positions=original",
    "corrcomp:keep=0.25,positions=original", "vmtc:keep=0.25,positions=original",
]
DEFAULT_TASKS = ["synth-vqa", "synth-pope"]
# the AnyRes model's rows of the default run: (model, tasks, methods, limit)
DEFAULT_NEXT = ("tiny-llava-next", ["synth-hires"],
                ["none", "random:keep=0.25", "visionzip:keep=0.25", "globalcom2:keep=0.25", "corrcomp",
                 "globalcom2:keep=0.25,positions=original", "corrcomp:positions=original"], 96)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .benchmarks import report, runner
    from .models import builtin_models

    models = args.model or [m for m in ("tiny-llava",) if m in builtin_models()]
    if not models:
        print("no built-in model is shipped in this installation; pass --model PATH_OR_ID", file=sys.stderr)
        return 2
    cfg = runner.RunConfig(
        models=models, tasks=args.task or DEFAULT_TASKS, methods=args.method or DEFAULT_METHODS, out=args.out,
        limit=args.limit if args.limit is not None else (None if args.task else 300), batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, data=args.data, seed=args.seed, speed=not args.no_speed,
        speed_repeats=args.repeats, command="mmtoken " + " ".join(sys.argv[1:]),
        extra=[DEFAULT_NEXT] if not (args.model or args.task or args.method) and DEFAULT_NEXT[0] in builtin_models() else [],
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = runner.run(cfg)
    if runner.get_dist().rank == 0:
        print(report.markdown(summary))
        plots = report.plot_pareto(summary, args.out)
        print(f"\nwrote {args.out}/summary.json, summary.csv, summary.md" + (f" and {len(plots)} plot(s)" if plots else " (install matplotlib for plots)"))
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    from .benchmarks import speed
    from .benchmarks.tasks import get_bench_task
    from .models import load_model

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    task = get_bench_task(args.task, args.data)
    sizes = [int(x) for x in args.batch_size.split(",")]
    items = task.items(max(sizes))
    print("| method | batch | prefill s | oracle prefill s | decode s/token | samples/s | tokens/s | peak mem MB | prefill GFLOPs |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method in args.method or ["none"]:
        for b in sizes:
            r = speed.measure(lm, items[:b], method, task.max_new_tokens, args.device, repeats=args.repeats)
            o = f"{r['oracle_prefill_s']:.4f}" if r["oracle_prefill_s"] is not None else ""
            print(f"| `{method}` | {b} | {r['prefill_s']:.4f} | {o} | {r['decode_s_per_token']:.5f} | {r['samples_per_s']:.2f} | "
                  f"{r['tokens_per_s']:.1f} | {r['peak_mem_bytes'] / 2**20:.0f} | {r['prefill_flops'] / 1e9:.2f} |")
    if args.trace:
        import os

        from torch.profiler import ProfilerActivity, profile

        from .benchmarks.runner import prepare_inputs

        inputs = prepare_inputs(lm, items[: sizes[-1]], args.device)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        import mmtoken

        handle = mmtoken.apply(lm.model, args.method[-1]) if args.method and args.method[-1] != "none" else None
        try:
            with profile(activities=acts) as prof, torch.inference_mode():
                lm.model(**inputs, logits_to_keep=1)
        finally:
            if handle is not None:
                handle.remove()
        os.makedirs(args.trace, exist_ok=True)
        path = os.path.join(args.trace, "prefill_trace.json")
        prof.export_chrome_trace(path)
        print(f"trace: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmtoken", description="Visual-token compression plugins for multimodal LLMs")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("list", help="list plugins and supported models")
    s.add_argument("-v", "--verbose", action="store_true", help="show every plugin's parameters")
    s.set_defaults(fn=_cmd_list)
    s = sub.add_parser("demo", help="run every baseline plugin on a small random model (no downloads)")
    s.add_argument("--batch-size", type=int, default=2)
    s.add_argument("--new-tokens", type=int, default=8)
    s.set_defaults(fn=_cmd_demo)
    s = sub.add_parser("prefill", help="prefill time: plugin vs full vs oracle on a random 576-token model")
    s.add_argument("--keep", type=float, default=0.25)
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--size", default="small", choices=["small", "test"])
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--repeats", type=int, default=7)
    s.add_argument("--threads", type=int, default=0)
    s.set_defaults(fn=_cmd_prefill)
    s = sub.add_parser("bench", help="accuracy, fidelity and speed of methods on tasks (no arguments: the embedded default)")
    s.add_argument("--model", action="append", help="built-in name, local path or HF id (repeatable)")
    s.add_argument("--task", action="append", help="task name (repeatable): synth-vqa, synth-pope, synth-caption, synth-format, synth-hires, synth-doc, vqav2, gqa, ...")
    s.add_argument("--method", action="append", help="spec, sweeps allowed: fastv:keep=0.5,0.25 (repeatable); none = uncompressed")
    s.add_argument("--limit", type=int, default=None, help="samples per task (default: all; 300 for the embedded default)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--data", default=None, help="folder of a real benchmark's files")
    s.add_argument("--out", default="runs/bench")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--repeats", type=int, default=5, help="timed repeats per speed figure")
    s.add_argument("--no-speed", action="store_true", help="skip the speed measurements")
    s.add_argument("--threads", type=int, default=0)
    s.set_defaults(fn=_cmd_bench)
    s = sub.add_parser("profile", help="speed of one model and method(s) over a batch-size sweep")
    s.add_argument("--model", required=True)
    s.add_argument("--method", action="append")
    s.add_argument("--task", default="synth-vqa")
    s.add_argument("--data", default=None)
    s.add_argument("--batch-size", default="1,8,32", help="comma-separated sizes")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--trace", default=None, help="folder for a torch.profiler trace of the last prefill")
    s.set_defaults(fn=_cmd_profile)

    s = sub.add_parser("tokbench", help="an image tokenizer's reconstructions vs token count: PSNR, SSIM, VQA accuracy")
    s.add_argument("--tokenizer", default="tiny-seed", help="built-in name or saved folder")
    s.add_argument("--model", default="tiny-llava", help="VQA model for semantic fidelity ('' to skip)")
    s.add_argument("--limit", type=int, default=200, help="held-out synth-vqa images")
    s.add_argument("--steps", type=int, default=25, help="decoder steps (FlexTok: Euler steps)")
    s.add_argument("--guidance", type=float, default=1.0, help="FlexTok: classifier-free guidance scale (1: none)")
    s.add_argument("--norm-guidance", action="store_true",
                   help="FlexTok: apply --guidance as APG (adaptive projected guidance); the official FlexTok README "
                        "decodes with --guidance 7.5 and APG")
    s.add_argument("--seeds", default="0", help="FlexTok: decoding seeds, comma-separated; rows report the mean and each seed")
    s.add_argument("--out", default="runs/tokbench")
    s.set_defaults(fn=_cmd_tokbench)
    return p


def _cmd_tokbench(args: argparse.Namespace) -> int:
    from . import tokenizers
    from .models import load_model
    from .tokenizers import evaluate as tev

    tok = tokenizers.load(args.tokenizer)
    try:
        seeds = [int(v) for v in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds: comma-separated integers, got {args.seeds!r}") from None
    try:
        tev.check_decoding(tok, args.guidance, seeds, args.norm_guidance)  # before the model loads
    except ValueError as exc:
        raise SystemExit(f"{args.tokenizer}: {exc}") from None
    lm = load_model(args.model) if args.model else None
    result = tev.evaluate(tok, lm, limit=args.limit, steps=args.steps, guidance=args.guidance, seeds=seeds,
                          norm_guidance=args.norm_guidance)
    result["command"] = "mmtoken " + " ".join(sys.argv[1:])
    written = tev.write(result, args.out, f"{args.tokenizer} on {result['n']} held-out scenes")
    print(open(written[1]).read())
    print("wrote " + ", ".join(written))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
