"""``mmtoken.apply``: patch one model instance with plugins; the returned handle undoes it."""

from __future__ import annotations

from typing import Any

import torch

from .adapters import get_adapter
from .adapters.llava import LlavaAdapter, Stats
from .errors import CompositionError
from .plugin import Plugin, build_plugins

_ATTR = "_mmtoken_handle"


class Handle:
    """A patched model. Use as a context manager or call :meth:`remove`; after removal the model's
    outputs are bit-identical to the unpatched model's."""

    def __init__(self, model: torch.nn.Module, adapter: LlavaAdapter, plugins: list[Plugin]):
        self.model = model
        self.adapter = adapter
        self.plugins = plugins
        self.active = True

    @property
    def spec(self) -> str:
        """The spec string that rebuilds these plugins."""
        return "+".join(p.config.to_spec() for p in self.plugins)

    @property
    def stats(self) -> Stats:
        """Token counts of the last forward pass: per image in and out of the visual stage, and per
        sample entering each LLM layer (``llm_visual_tokens``)."""
        return self.adapter.stats

    def remove(self) -> None:
        if not self.active:
            return
        self.adapter.remove()
        if getattr(self.model, _ATTR, None) is self:
            delattr(self.model, _ATTR)
        self.active = False

    def __enter__(self) -> "Handle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<mmtoken.Handle {self.spec!r} on {type(self.model).__name__} ({state})>"


def apply(model: torch.nn.Module, spec: Any, **params: Any) -> Handle:
    """Patch ``model`` (this instance only) with the plugins named by ``spec``.

    ``spec``: a plugin name, ``"fastv:k=2,keep=0.5"``, a composition ``"tome:keep=0.5+fastv:k=2"``, a list
    of those, or :class:`~mmtoken.plugin.Plugin` instances. ``params`` set parameters of a single plugin.
    Everything is validated before the model is touched: on any error the model is left unchanged.
    """
    adapter = get_adapter(model)
    plugins = build_plugins(spec, **params)
    existing = getattr(model, _ATTR, None)
    if existing is not None and existing.active:
        raise CompositionError(
            f"this model is already patched with {existing.spec!r}; remove that handle first or compose the "
            "plugins in one spec"
        )
    try:
        adapter.install(plugins)
    except Exception:
        adapter.remove()
        raise
    handle = Handle(model, adapter, plugins)
    setattr(model, _ATTR, handle)
    return handle
