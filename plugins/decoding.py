"""Plain decoding baselines as methods: ``greedy`` and ``beam`` (`decode` stage).

They change nothing but the decoding strategy of ``generate``, so the harness can put a decoding method
such as ``opera`` beside the plain strategy it modifies, at the same beam count:
``--method greedy --method beam:num_beams=5 --method opera:num_beams=5``. ``greedy`` is what ``none``
already does (``num_beams=1``, no sampling); it exists so that tables name the strategy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from mmtoken.config import PluginConfig, param
from mmtoken.plugin import Plugin, register_plugin


def _with(generate: Callable[..., Any], **fixed: Any) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        kwargs.update(fixed)
        return generate(*args, **kwargs)

    return wrapped


@dataclass
class GreedyConfig(PluginConfig):
    pass


@register_plugin
class GreedyPlugin(Plugin):
    name = "greedy"
    stages = ("decode",)
    Config = GreedyConfig
    compresses = False

    def wrap_generate(self, generate: Callable[..., Any], model: Any) -> Callable[..., Any]:
        return _with(generate, num_beams=1, do_sample=False)


@dataclass
class BeamConfig(PluginConfig):
    num_beams: int = param(5, lo=1, doc="beams")
    length_penalty: float = param(1.0, doc="exponent of the length normalisation of finished beams")


@register_plugin
class BeamPlugin(Plugin):
    name = "beam"
    stages = ("decode",)
    Config = BeamConfig
    compresses = False

    def wrap_generate(self, generate: Callable[..., Any], model: Any) -> Callable[..., Any]:
        c = self.config
        return _with(generate, num_beams=c.num_beams, length_penalty=c.length_penalty, do_sample=False)
