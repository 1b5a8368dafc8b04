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


_CLASSES = {  # model_type -> (module, model class, processor class)
    "llava": ("llava", "LlavaForConditionalGeneration", "LlavaProcessor"),
    "llava_next": ("llava_next", "LlavaNextForConditionalGeneration", "LlavaNextProcessor"),
}


def _model_type(path: str, name_or_path: str) -> str:
    """The checkpoint's ``model_type``, read from a local ``config.json`` (no ``AutoConfig`` import) or,
    for a Hugging Face id, through ``AutoConfig`` from the local cache."""
    local = os.path.join(path, "config.json")
    if os.path.isfile(local):
        with open(local) as f:
            return json.load(f).get("model_type", "")
    if os.path.isdir(path):
        raise MmtokenError(f"cannot load model {name_or_path!r}: the folder has no config.json")
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as exc:
        raise MmtokenError(f"cannot load model {name_or_path!r}: not a built-in name ({', '.join(builtin_models()) or 'none shipped'}), "
                           f"a local folder, or a cached Hugging Face id ({exc.__class__.__name__})") from None


def load_model(name_or_path: str, device: str = "cpu", dtype: str | torch.dtype = "float32", attn: str = "sdpa") -> LoadedModel:
    """A model, its processor and its prompt template. ``name_or_path``: a built-in name
    (:func:`builtin_models`), a local folder, or a Hugging Face id available in the local cache.

    The model and processor classes are imported directly from their ``transformers`` modules (the Auto
    classes cost about a second of imports); a checkpoint whose processor is another class is loaded with
    ``AutoProcessor``."""
    import importlib

    path = resolve(name_or_path)
    model_type = _model_type(path, name_or_path)
    if model_type not in _CLASSES:
        raise MmtokenError(f"model type {model_type!r} is not supported; supported: {sorted(_CLASSES)}")
    module, model_cls, processor_cls = _CLASSES[model_type]
    modeling = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    model = getattr(modeling, model_cls).from_pretrained(path, dtype=torch_dtype, attn_implementation=attn, use_safetensors=True)
    model.to(device).eval()
    declared = None
    proc_cfg = os.path.join(path, "processor_config.json")
    if os.path.isfile(proc_cfg):
        with open(proc_cfg) as f:
            declared = json.load(f).get("processor_class")
    if declared == processor_cls:
        processing = importlib.import_module(f"transformers.models.{module}.processing_{module}")
        processor = getattr(processing, processor_cls).from_pretrained(path)
    else:
        from transformers import AutoProcessor

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
