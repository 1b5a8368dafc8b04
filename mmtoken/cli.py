"""The ``mmtoken`` command line: ``mmtoken list``, ``mmtoken demo``, ``mmtoken prefill``."""

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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
