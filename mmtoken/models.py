"""Loading models and their processors: built-in tiny models by name, or any local path / HF id.

Built-in models ship inside the package (``mmtoken/checkpoints/<name>``) as ordinary Hugging Face folders
(safetensors weights, JSON config, tokenizer and processor), so ``from_pretrained(path)`` works on them
exactly as on a 7B checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from .errors import MmtokenError

CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")
LLAVA15_PROMPT = "USER: <image>\n{question} ASSISTANT:"


def eos_token_ids(generation_config: Any) -> list[int]:
    """A generation config's end-of-sequence ids as a list (it may hold None, one id or several)."""
    eos = generation_config.eos_token_id
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def builtin_models() -> list[str]:
    if not os.path.isdir(CHECKPOINTS):
        return []
    return sorted(d for d in os.listdir(CHECKPOINTS) if os.path.isfile(os.path.join(CHECKPOINTS, d, "config.json")))


def resolve(name_or_path: str) -> str:
    if name_or_path in builtin_models():
        return os.path.join(CHECKPOINTS, name_or_path)
    return name_or_path


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    processor: Any
    prompt: str  # template with {question} and one <image>

    def format(self, question: str, with_image: bool = True) -> str:
        text = self.prompt.format(question=question)
        return text if with_image else text.replace("<image>", "").replace("  ", " ")


def load_model(name_or_path: str, device: str = "cpu", dtype: str | torch.dtype = "float32", attn: str = "sdpa") -> LoadedModel:
    """A model, its processor and its prompt template. ``name_or_path``: a built-in name
    (:func:`builtin_models`), a local folder, or a Hugging Face id available in the local cache."""
    from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    path = resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise MmtokenError(f"cannot load model {name_or_path!r}: not a built-in name ({', '.join(builtin_models()) or 'none shipped'}), "
                           f"a local folder, or a cached Hugging Face id ({exc.__class__.__name__})") from None
    classes = {"llava": LlavaForConditionalGeneration, "llava_next": LlavaNextForConditionalGeneration}
    if config.model_type not in classes:
        raise MmtokenError(f"model type {config.model_type!r} is not supported; supported: {sorted(classes)}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = classes[config.model_type].from_pretrained(path, dtype=torch_dtype, attn_implementation=attn, use_safetensors=True)
    model.to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    if hasattr(processor, "tokenizer"):
        processor.tokenizer.padding_side = "left"
    card = os.path.join(path, "mmtoken_world.json")
    if os.path.isfile(card):
        with open(card) as f:
            prompt = json.load(f)["prompt"]
    else:
        prompt = LLAVA15_PROMPT
    return LoadedModel(name=name_or_path, model=model, processor=processor, prompt=prompt)
