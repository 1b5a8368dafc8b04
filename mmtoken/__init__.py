"""mmtoken: compress and control the visual tokens of multimodal LLMs in Hugging Face ``transformers``.

    import mmtoken
    with mmtoken.apply(model, "fastv:k=2,keep=0.25"):
        out = model.generate(**inputs)
"""

from __future__ import annotations

import importlib.util
import os
import sys

__version__ = "0.1.0"


def _alias_source_tree() -> None:
    """In a source checkout the plugins and benchmarks live in top-level ``plugins/`` and
    ``benchmarks/``; an installed package has them as ``mmtoken/plugins`` and ``mmtoken/benchmarks``.
    Make ``mmtoken.plugins`` / ``mmtoken.benchmarks`` resolve in both cases."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    for sub in ("plugins", "benchmarks"):
        name = f"{__name__}.{sub}"
        if name in sys.modules or os.path.isdir(os.path.join(here, sub)):
            continue
        init = os.path.join(root, sub, "__init__.py")
        if not os.path.isfile(init):
            continue
        spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[os.path.join(root, sub)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


_alias_source_tree()

from .config import BudgetConfig, PluginConfig, param  # noqa: E402
from .errors import (  # noqa: E402
    CompositionError,
    ConfigError,
    MmtokenError,
    SpecError,
    UnsupportedModelError,
)
from .handle import Handle, apply  # noqa: E402
from .models import builtin_models, load_model  # noqa: E402
from .plugin import Plugin, list_plugins, parse_spec, register_plugin  # noqa: E402

__all__ = [
    "apply",
    "Handle",
    "list_plugins",
    "load_model",
    "builtin_models",
    "parse_spec",
    "register_plugin",
    "Plugin",
    "PluginConfig",
    "BudgetConfig",
    "param",
    "MmtokenError",
    "SpecError",
    "ConfigError",
    "UnsupportedModelError",
    "CompositionError",
]
