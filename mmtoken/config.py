"""Plugin configuration: dataclasses whose fields carry a valid range, parse from spec strings, and
round-trip through JSON.

A plugin declares its parameters as a dataclass deriving from :class:`PluginConfig` (or
:class:`BudgetConfig` for compression plugins), each field built with :func:`param`::

    @dataclass
    class FastVConfig(BudgetConfig):
        k: int = param(2, lo=1, doc="K: the decoder layer after which image tokens are dropped")

``FastVConfig.from_params({"k": "3", "keep": "0.25"})`` parses strings (what the CLI passes),
``cfg.to_dict()`` / ``FastVConfig.from_dict(d)`` round-trip through JSON, and construction validates.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

_NO_BOUND = None


def param(
    default: Any,
    *,
    lo: float | None = _NO_BOUND,
    hi: float | None = _NO_BOUND,
    lo_open: bool = False,
    choices: tuple | None = None,
    doc: str = "",
) -> Any:
    """A config field with a validated range: ``lo <= value <= hi`` (``lo < value`` if ``lo_open``),
    or ``value in choices``. ``doc`` is shown by ``mmtoken list`` and in error messages."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "doc": doc}
    return field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[type, bool]:
    """(the concrete type, whether None is allowed) for ``int``, ``float | None``, ``Optional[str]``..."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported config field type {tp!r}")
        return args[0], True
    return tp, False


def _parse_scalar(name: str, text: str, tp: type, optional: bool, owner: str) -> Any:
    s = text.strip()
    if optional and s.lower() in ("none", "null"):
        return None
    try:
        if tp is bool:
            low = s.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if tp is int:
            f = float(s)
            if not f.is_integer():
                raise ValueError
            return int(f)
        if tp is float:
            return float(s)
        if tp is str:
            return s
    except ValueError:
        pass
    raise ConfigError(f"{owner}: parameter {name}={text!r} is not a valid {tp.__name__}")


@dataclass
class PluginConfig:
    """Base class of every plugin's configuration."""

    plugin_name: ClassVar[str] = "plugin"

    def __post_init__(self) -> None:
        self.validate()

    # -- validation -----------------------------------------------------------------------------
    @classmethod
    def _fields(cls) -> dict[str, dataclasses.Field]:
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def _types(cls) -> dict[str, tuple[type, bool]]:
        hints = typing.get_type_hints(cls)
        return {name: _base_type(hints[name]) for name in cls._fields()}

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first field whose value is of the wrong type or out of range."""
        owner = self.plugin_name
        types_ = self._types()
        for name, f in self._fields().items():
            value = getattr(self, name)
            tp, optional = types_[name]
            if value is None:
                if not optional:
                    raise ConfigError(f"{owner}: parameter {name} may not be None")
                continue
            if tp is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                object.__setattr__(self, name, value)
            if tp is int and isinstance(value, float) and value.is_integer():
                value = int(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, tp) or (tp is not bool and isinstance(value, bool)):
                raise ConfigError(f"{owner}: parameter {name}={value!r} must be of type {tp.__name__}")
            if tp is float and not math.isfinite(value):
                raise ConfigError(f"{owner}: parameter {name}={value!r} must be finite")
            meta = f.metadata
            choices = meta.get("choices")
            if choices is not None and value not in choices:
                raise ConfigError(f"{owner}: parameter {name}={value!r} must be one of {list(choices)}")
            lo, hi = meta.get("lo"), meta.get("hi")
            if lo is not None and (value <= lo if meta.get("lo_open") else value < lo):
                op = ">" if meta.get("lo_open") else ">="
                raise ConfigError(f"{owner}: parameter {name}={value!r} out of range: must be {op} {lo}")
            if hi is not None and value > hi:
                raise ConfigError(f"{owner}: parameter {name}={value!r} out of range: must be <= {hi}")

    # -- construction -----------------------------------------------------------------------------
    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "PluginConfig":
        """Build from keyword parameters; string values (from a spec string) are parsed by field type."""
        known = cls._fields()
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ConfigError(
                f"{cls.plugin_name}: unknown parameter(s) {unknown}; valid parameters: {sorted(known)}"
            )
        types_ = cls._types()
        values = {}
        for name, value in params.items():
            if isinstance(value, str) and types_[name][0] is not str:
                value = _parse_scalar(name, value, *types_[name], owner=cls.plugin_name)
            values[name] = value
        try:
            return cls(**values)
        except TypeError as exc:  # e.g. a wrong type the dataclass itself refused
            raise ConfigError(f"{cls.plugin_name}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PluginConfig":
        return cls.from_params(dict(d))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PluginConfig":
        return cls.from_dict(json.loads(text))

    def to_spec(self) -> str:
        """The spec string that rebuilds this config (non-default values only)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        parts = [f"{k}={v}" for k, v in self.to_dict().items() if v != defaults[k]]
        return self.plugin_name + (":" + ",".join(parts) if parts else "")

    @classmethod
    def describe(cls) -> list[tuple[str, str, Any, str]]:
        """(name, type, default, doc) for each parameter, for listings."""
        types_ = cls._types()
        out = []
        for name, f in cls._fields().items():
            tp, optional = types_[name]
            out.append((name, tp.__name__ + (" | None" if optional else ""), f.default, f.metadata.get("doc", "")))
        return out


@dataclass
class BudgetConfig(PluginConfig):
    """Config of a compression plugin: the common budget every compression plugin accepts.

    ``keep`` is the fraction of visual tokens that reach the LLM (0 < keep <= 1); ``tokens`` is the
    count per image (per crop-packed image for AnyRes models). At most one may be set; each plugin maps
    the budget onto its own parameters (its docstring says how) and reports what it really kept.
    """

    keep: float | None = param(None, lo=0.0, hi=1.0, lo_open=True, doc="fraction of visual tokens kept, (0, 1]")
    tokens: int | None = param(None, lo=1, doc="number of visual tokens kept per image")

    def validate(self) -> None:
        super().validate()
        if self.keep is not None and self.tokens is not None:
            raise ConfigError(f"{self.plugin_name}: give at most one of keep= and tokens=")

    def refuse_with_budget(self, given: bool, what: str) -> None:
        """Raise when a plugin's own size parameters (``what``, e.g. ``"r="``) are ``given`` with the budget."""
        if given and self.has_budget:
            raise ConfigError(f"{self.plugin_name}: give either {what} or the budget (keep= / tokens=), not both")

    def budget(self, n: int, default_keep: float | None = None) -> int:
        """Tokens to keep out of ``n`` under this budget (``n`` when no budget and no default)."""
        if self.tokens is not None:
            return max(1, min(n, self.tokens))
        keep = self.keep if self.keep is not None else default_keep
        if keep is None:
            return n
        return max(1, min(n, int(round(keep * n))))

    def view_budgets(self, sizes: list[int], default_keep: float | None = None) -> list[int]:
        """Per-view budgets of one image whose views (the base image and each AnyRes crop; one view for
        LLaVA-1.5) hold ``sizes`` tokens: ``keep`` applies to every view alike; ``tokens``, a count per
        image, is shared among the views in proportion to their sizes (largest remainders), each view
        keeping at least one token."""
        if self.tokens is None or len(sizes) <= 1:
            return [self.budget(n, default_keep) for n in sizes]
        total = min(sum(sizes), max(self.tokens, len(sizes)))
        exact = [total * n / sum(sizes) for n in sizes]
        out = [max(1, min(n, int(e))) for e, n in zip(exact, sizes)]
        by_remainder = sorted(range(len(sizes)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
        while sum(out) < total:
            i = next(i for i in by_remainder if out[i] < sizes[i])
            out[i] += 1
            by_remainder.remove(i)
            by_remainder.append(i)
        while sum(out) > total:
            i = max(range(len(out)), key=lambda i: out[i])
            out[i] -= 1
        return out

    def per_view(self, tokens: Any, default_keep: float | None = None) -> list[tuple[int, Any, int]]:
        """``(view, indices, budget)`` for every view of one image's ``VisualTokens`` (:meth:`view_budgets`)."""
        views = tokens.views()
        budgets = self.view_budgets([int(idx.numel()) for _, idx in views], default_keep)
        return [(view, idx, budget) for (view, idx), budget in zip(views, budgets)]

    @property
    def has_budget(self) -> bool:
        return self.keep is not None or self.tokens is not None


POSITIONS = ("compact", "original")


@dataclass
class ShortenConfig(BudgetConfig):
    """Config of a plugin that shortens the image span before the LLM (`vision` and `visual` stages).

    ``positions`` sets the position ids the LLM gives the shortened sequence. ``compact`` (default) numbers
    it afresh, as feeding fewer tokens does in the methods' official code: every token after a removed one
    moves closer to the text. ``original`` keeps each kept token at the position id it had in the full
    sequence (a merged token at its first patch's, a newline at its row's), and the text after the image at
    its own, so RoPE still sees where each token was; removed tokens leave gaps, as after an `llm`-stage
    drop (FastV, DyVTE), which always keeps the original ids. Plugins composed on one model must agree.
    """

    positions: str = param("compact", choices=POSITIONS, doc="position ids after shortening: compact | original")
