"""Model adapters: one per supported model family."""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter

ADAPTERS = (LlavaAdapter, LlavaNextAdapter)


def supported_model_classes() -> list[str]:
    return [name for a in ADAPTERS for name in a.model_classes]


def get_adapter(model: torch.nn.Module) -> LlavaAdapter:
    """The adapter for ``model``'s class, or :class:`UnsupportedModelError` naming the supported ones."""
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    raise UnsupportedModelError(
        f"mmtoken has no adapter for {name}; supported model classes: {', '.join(supported_model_classes())}"
    )
