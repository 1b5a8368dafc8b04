"""Train DyVTE exit routers for a frozen model and save them beside it (``dyvte_routers.safetensors``).

For the built-in tiny models the training data are synth-vqa and synth-pope questions on training scenes
(never the held-out ones), with the answer teacher-forced:

    python scripts/train_dyvte_routers.py --model tiny-llava                 # ~5 min on 2 CPU cores
    python scripts/train_dyvte_routers.py --model tiny-llava --quick --out /tmp/r.safetensors

For a real model on a GPU, write a batch stream of your instruction data in the same format (see
:func:`mmtoken.plugins.dyvte.train_routers`: ``input_ids``, ``attention_mask``, ``pixel_values``,
``labels``, ``prompt_len``) and call ``train_routers`` with ``hidden=2048`` (the paper's width for 7B);
the paper trains on 1% of the instruction data for one epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmtoken.models import load_model  # noqa: E402
from mmtoken.plugins.dyvte import ROUTER_FILE, train_routers  # noqa: E402
from mmtoken.world import get_task, render  # noqa: E402


def world_batches(lm, tasks: list[str], batch: int, seed: int):
    """Endless teacher-forced batches of training-split questions (left-padded, answer + ``</s>`` last)."""
    tok = lm.processor.tokenizer
    size = lm.model.config.vision_config.image_size
    index = seed * 1_000_003
    while True:
        samples = []
        for _ in range(batch):
            task = get_task(tasks[index % len(tasks)])
            samples.append(task.sample("train", index))
            index += 1
        answers = [s.answers[0] + " " + tok.eos_token for s in samples]
        n_answer = [len(tok(a, add_special_tokens=False)["input_ids"]) for a in answers]
        texts = [lm.format(s.question, True) + " " + a for s, a in zip(samples, answers)]
        enc = lm.processor(text=texts, images=[render(s.scene, size) for s in samples], return_tensors="pt", padding=True)
        width = enc["input_ids"].shape[1]
        labels = torch.full_like(enc["input_ids"], -100)
        for i, n in enumerate(n_answer):
            labels[i, width - n :] = enc["input_ids"][i, width - n :]
        yield dict(enc, labels=labels, prompt_len=torch.tensor([width - n for n in n_answer]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-llava")
    ap.add_argument("--out", default=None, help=f"router file (default: {ROUTER_FILE} in the model's folder)")
    ap.add_argument("--tasks", default="synth-vqa,synth-pope")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=64, help="router width h")
    ap.add_argument("--text", default="all", choices=("after", "all"), help="text tokens averaged (see the plugin)")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="a few steps (checks the script)")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch = 3, 4
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    out = args.out or os.path.join(lm.model.config._name_or_path, ROUTER_FILE)
    t0 = time.time()

    def log(rec):
        if rec["step"] % 25 == 0 or rec["step"] == args.steps - 1:
            print(f"step {rec['step']} layer {rec['layer']} loss {rec['loss']:.3f} exit-ok {rec['exit_ok']:.2f} "
                  f"router acc {rec['acc']:.2f} {time.time() - t0:.0f}s", flush=True)

    batches = world_batches(lm, args.tasks.split(","), args.batch, args.seed)
    routers, hist = train_routers(lm.model, batches, args.steps, hidden=args.hidden, text=args.text, lr=args.lr,
                                  seed=args.seed, log=log)
    routers.save(out)
    with open(os.path.splitext(out)[0] + "_curve.json", "w") as f:
        json.dump({"args": vars(args), "wall_s": time.time() - t0, "steps": hist}, f)
    print(f"wrote {out} in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
