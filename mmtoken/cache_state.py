"""Per-position plugin state kept inside a KV cache, beside the model's layers.

A plugin that remembers something for every cached position during decoding (CMAI: each text token's
attention over the image) must follow every edit of the cache: beam search reorders its rows, a rollback
gathers and crops them, OPERA keeps one candidate column per row. Stored as an extra cache layer whose
keys are the state, it gets each of those edits for free, exactly as the model's own keys do; the model
never reads it, since it sits after the model's layers.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers.cache_utils import DynamicLayer


class PositionState(DynamicLayer):
    """A cache layer holding ``[B, S, D]`` per-position state as keys ``[B, 1, S, D]`` (values empty)."""

    def __init__(self, state: Tensor):
        super().__init__()
        self.is_initialized = True
        self.device = state.device
        self.set(state)

    def set(self, state: Tensor) -> None:
        self.keys = state[:, None]
        self.values = state.new_zeros(state.shape[0], 1, state.shape[1], 0)

    def get(self) -> Tensor:
        return self.keys[:, 0]


def attach_state(cache: Any, n_layers: int, state: Tensor) -> PositionState | None:
    """Append ``state`` ``[B, S, D]`` to ``cache`` (S = the positions the cache holds, in its column order) and
    return its layer; None when there is no cache. A cache that creates its layers as the model reaches them
    (``DynamicCache()`` without a config) first gets its missing model layers, empty, so that the state
    sits after all of them."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    while len(layers) < n_layers:
        make = getattr(cache, "layer_class_to_replicate", None) or DynamicLayer
        layers.append(make())
    slot = PositionState(state)
    layers.append(slot)
    return slot
