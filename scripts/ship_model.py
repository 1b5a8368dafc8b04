"""Copy a trained model into the package as a built-in checkpoint (fp16 safetensors + JSON files).

    python scripts/ship_model.py runs/tiny-llava tiny-llava ["phase description"]

Reads ``SRC/model`` and ``SRC/curve.json`` (the training script's output) and writes
``mmtoken/checkpoints/NAME`` with the weights in float16 (loaded back as float32 by ``load_model``), the
tokenizer, processor and prompt card, and ``training_curve.json``. With a phase description, a model that
continues the shipped one keeps its lineage: the new run is appended to the shipped file's ``phases``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(src: str, name: str, phase: str | None = None) -> None:
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    dst = os.path.join(ROOT, "mmtoken", "checkpoints", name)
    old = None
    if phase and os.path.isfile(os.path.join(dst, "training_curve.json")):
        old = json.load(open(os.path.join(dst, "training_curve.json")))
    if os.path.isdir(dst):
        extra = sorted(set(os.listdir(dst)) - {"config.json", "generation_config.json", "mmtoken_world.json", "model.safetensors",
                                              "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                                              "training_curve.json", "chat_template.jinja"})
        if extra:  # e.g. DyVTE routers: trained on the old weights, so they go with them
            print(f"removing files trained on the previous weights: {extra} (retrain them)")
        shutil.rmtree(dst)
    cls = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}[
        AutoConfig.from_pretrained(os.path.join(src, "model")).model_type]
    model = cls.from_pretrained(os.path.join(src, "model"), dtype=torch.float16)
    model.save_pretrained(dst, safe_serialization=True)
    AutoProcessor.from_pretrained(os.path.join(src, "model")).save_pretrained(dst)
    shutil.copy(os.path.join(src, "model", "mmtoken_world.json"), dst)
    curve = json.load(open(os.path.join(src, "curve.json")))
    if phase:
        script = json.load(open(os.path.join(src, "model", "mmtoken_world.json"))).get("trained_by", "scripts/train_tiny_llava.py")
        args = curve.get("args", {})
        command = f"python {script} " + " ".join(
            f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in args.items()
            if v is not None and v is not False and k != "quick")
        old = old if old is not None and "phases" in old else {"phases": []}
        old["phases"].append({"phase": phase, "command": command, "vision": curve.get("vision", []), "lm": curve.get("lm", [])})
        curve = old
    with open(os.path.join(dst, "training_curve.json"), "w") as f:
        json.dump(curve, f, indent=1)
    print(dst, sorted(os.listdir(dst)))


if __name__ == "__main__":
    main(*sys.argv[1:])
