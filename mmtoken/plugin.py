"""Plugin base class, the plugin registry (built-ins + the ``mmtoken.plugins`` entry-point group) and the
spec-string parser.

A spec is a plugin name with optional parameters, ``"fastv:k=2,keep=0.5"``; plugins compose along the
forward pass with ``+`` (``"tome:keep=0.5+fastv:k=2"``) or as a list. Stages, in forward order:

``vision``    inside vision-encoder layers (between attention and MLP);
``visual``    per image / crop between the projector and the LLM;
``llm``       between decoder layers during prefill;
``attention`` an additive bias on chosen (query, key) pairs inside LLM attention;
``decode``    the generation loop.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from torch import Tensor

from .config import PluginConfig
from .errors import SpecError

if TYPE_CHECKING:
    from .tokens import Selection, VisualRequest, VisualTokens

STAGES = ("vision", "visual", "llm", "attention", "decode")
ENTRY_POINT_GROUP = "mmtoken.plugins"
BUILTIN_PLUGINS = (
    "random", "pool", "visionzip", "fastv", "tome", "turbo", "globalcom2", "corrcomp", "vmtc", "cmai", "oracle", "opera", "decoding",
    "dyvte",
)


@dataclass
class VisionContext:
    """Inside one ViT layer, after the attention residual and before the MLP (the `vision` stage).

    ``x`` ``[B, T, D]`` tokens (index 0 is CLS when ``has_cls``), ``keys`` ``[B, T, D]`` the layer's keys
    (heads concatenated), ``sizes`` ``[B, T]`` patches per token, ``pos`` ``[B, T]`` index of each token's
    first patch (-1 for CLS). A plugin replaces ``x``, ``sizes`` and ``pos`` with merged versions.
    """

    layer: int
    n_layers: int
    x: Tensor
    keys: Tensor
    sizes: Tensor
    pos: Tensor
    num_heads: int
    has_cls: bool
    cls_attn: Tensor | None = None  # [B, T] post-softmax CLS row, head mean (when requested)


@dataclass
class LLMContext:
    """At an LLM decoder layer during prefill (the `llm` stage), in the layer's current coordinates.

    ``hidden`` ``[B, L, D]`` the layer's input, ``image_mask`` / ``valid`` ``[B, L]`` which positions are visual
    tokens / real (not padding), ``last`` ``[B]`` each sample's last real position, ``attn`` the attention
    rows requested for this drop: ``[B, Q, L]`` (mean over heads) for the query rows in ``attn_queries``.
    """

    layer: int
    n_layers: int
    hidden: Tensor
    image_mask: Tensor
    valid: Tensor
    last: Tensor
    attn: Tensor | None = None
    attn_queries: Tensor | None = None  # [B, Q] positions of the query rows of ``attn``


@dataclass
class LLMDrop:
    """A plugin's request to choose the tokens kept from decoder layer ``layer`` on, scored with the
    attention rows of layer ``rows_from`` (None: no rows), queried by ``queries``: ``"last"`` (each sample's
    last token) or ``"text"`` (every text token after the first image token)."""

    layer: int
    rows_from: int | None = None
    queries: str = "last"


class Plugin:
    """Base class of every plugin: a config dataclass bound to one or more stages.

    Subclasses set ``name``, ``stages``, ``Config`` and implement the hooks of their stages. The algorithm
    itself should be a pure tensor function in the same module, tested on its own.
    """

    name: ClassVar[str] = ""
    stages: ClassVar[tuple[str, ...]] = ()
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    compresses: ClassVar[bool] = True

    def __init__(self, config: PluginConfig):
        self.config = config

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.config.to_spec()}>"

    def bind(self, model: Any) -> None:
        """Called once when the plugin is installed on ``model``, before any other hook (e.g. to load
        weights that belong to that model). Raise :class:`~mmtoken.errors.MmtokenError` to refuse it."""

    # -- vision ---------------------------------------------------------------------------------
    def vision_layers(self, n_layers: int, n_tokens: int) -> list[int]:
        """ViT layers (0-based) whose tokens this plugin merges, for a tower of ``n_layers`` layers whose
        input has ``n_tokens`` tokens (CLS included)."""
        return []

    def vision_wants_cls_attn(self) -> bool:
        return False

    def vision_merge(self, ctx: VisionContext) -> None:
        raise NotImplementedError

    # -- visual ---------------------------------------------------------------------------------
    def visual_request(self) -> "VisualRequest":
        from .tokens import VisualRequest

        return VisualRequest()

    def select(self, tokens: "VisualTokens") -> "Selection":
        raise NotImplementedError

    # -- llm ------------------------------------------------------------------------------------
    def llm_plan(self, n_layers: int) -> list[LLMDrop]:
        return []

    def llm_keep(self, ctx: LLMContext) -> list[Tensor]:
        """Per sample, the positions (current coordinates) kept from ``ctx.layer`` on."""
        raise NotImplementedError

    # -- attention ------------------------------------------------------------------------------
    #: whether this plugin's bias decides which keys a query may see at all (OPERA's candidate block): such
    #: biases are added first, and the other attention plugins of the layer get them in ``ctx["mask"]``
    shapes_attention: bool = False

    def attention_layers(self, n_layers: int) -> list[int]:
        return []

    def attention_bias(self, layer: int, q_len: int, kv_len: int, ctx: dict[str, Any]) -> Tensor | None:
        """An additive bias broadcastable to ``[B, 1, q_len, kv_len]`` for this layer, or None."""
        return None

    # -- decode ---------------------------------------------------------------------------------
    def wrap_generate(self, generate: Callable[..., Any], model: Any) -> Callable[..., Any]:
        return generate


# ---------------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict[str, type[Plugin]] = {}
_ENTRY_POINTS_LOADED = False


def register_plugin(cls: type[Plugin]) -> type[Plugin]:
    """Class decorator: make ``cls`` available under ``cls.name`` to :func:`mmtoken.apply` and the CLI."""
    if not cls.name or not re.fullmatch(r"[a-z][a-z0-9_\-]*", cls.name):
        raise ValueError(f"invalid plugin name {cls.name!r}")
    bad = [s for s in cls.stages if s not in STAGES]
    if not cls.stages or bad:
        raise ValueError(f"plugin {cls.name}: stages must be a non-empty subset of {STAGES}, got {cls.stages}")
    cls.Config.plugin_name = cls.name
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for mod in BUILTIN_PLUGINS:
        importlib.import_module(f"mmtoken.plugins.{mod}")


def _load_entry_points() -> None:
    global _ENTRY_POINTS_LOADED
    if _ENTRY_POINTS_LOADED:
        return
    _ENTRY_POINTS_LOADED = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()
        if isinstance(obj, type) and issubclass(obj, Plugin) and obj.name not in _REGISTRY:
            register_plugin(obj)


def plugin_registry() -> dict[str, type[Plugin]]:
    _load_builtins()
    _load_entry_points()
    return dict(_REGISTRY)


def list_plugins() -> list[str]:
    """Names of every registered plugin (built-in and from the ``mmtoken.plugins`` entry-point group)."""
    return sorted(plugin_registry())


def get_plugin_class(name: str) -> type[Plugin]:
    reg = plugin_registry()
    if name not in reg:
        raise SpecError(f"unknown plugin {name!r}; available: {', '.join(sorted(reg))}")
    return reg[name]


# ---------------------------------------------------------------------------------------------------
# specs

_NAME_RE = re.compile(r"^[a-z][a-z0-9_\-]*$")


def parse_spec(spec: str) -> list[tuple[str, dict[str, str]]]:
    """``"tome:keep=0.5+fastv:k=2"`` -> ``[("tome", {"keep": "0.5"}), ("fastv", {"k": "2"})]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"malformed spec {spec!r}: expected 'name' or 'name:key=value,...'")
    out = []
    for part in spec.split("+"):
        part = part.strip()
        name, sep, rest = part.partition(":")
        name = name.strip()
        if not _NAME_RE.match(name):
            raise SpecError(f"malformed spec {spec!r}: {name!r} is not a plugin name")
        params: dict[str, str] = {}
        if sep:
            if not rest.strip():
                raise SpecError(f"malformed spec {spec!r}: nothing after ':' in {part!r}")
            for item in rest.split(","):
                key, eq, value = item.partition("=")
                key, value = key.strip(), value.strip()
                if not eq or not key or not value:
                    raise SpecError(
                        f"malformed spec {spec!r}: {item.strip()!r} is not key=value "
                        "(sweeps like keep=0.5,0.25 are expanded by `mmtoken bench`, not here)"
                    )
                if key in params:
                    raise SpecError(f"malformed spec {spec!r}: parameter {key!r} given twice")
                params[key] = value
        out.append((name, params))
    return out


def build_plugins(spec: Any, **params: Any) -> list[Plugin]:
    """Plugins for a spec string, a list of specs / Plugin instances, or one Plugin instance.

    Keyword ``params`` apply to a single plugin (they override the spec string's values)."""
    items: list[Any]
    if isinstance(spec, Plugin):
        items = [spec]
    elif isinstance(spec, str):
        items = list(parse_spec(spec))
    elif isinstance(spec, (list, tuple)):
        items = []
        for s in spec:
            if isinstance(s, Plugin):
                items.append(s)
            elif isinstance(s, str):
                items.extend(parse_spec(s))
            else:
                raise SpecError(f"malformed spec element {s!r}: expected a spec string or a Plugin")
        if not items:
            raise SpecError("empty spec list")
    else:
        raise SpecError(f"malformed spec {spec!r}: expected a string, a list or a Plugin")
    if params and len(items) != 1:
        raise SpecError("keyword parameters are ambiguous with several plugins; put them in the spec strings")
    plugins = []
    for item in items:
        if isinstance(item, Plugin):
            if params:
                raise SpecError("keyword parameters cannot be combined with a Plugin instance")
            plugins.append(item)
            continue
        name, p = item
        cls = get_plugin_class(name)
        merged: dict[str, Any] = dict(p)
        merged.update(params)
        plugins.append(cls(cls.Config.from_params(merged)))
    return plugins
