"""Exceptions raised by mmtoken. Every user-facing failure is one of these, with one clear message."""

from __future__ import annotations


class MmtokenError(Exception):
    """Base class of every error mmtoken raises on purpose."""


class SpecError(MmtokenError, ValueError):
    """A plugin spec string or list could not be parsed, or names an unknown plugin."""


class ConfigError(MmtokenError, ValueError):
    """A plugin parameter is unknown, has the wrong type, or lies outside its valid range."""


class UnsupportedModelError(MmtokenError, TypeError):
    """The model class has no adapter."""


class CompositionError(MmtokenError, ValueError):
    """Two plugins cannot be applied together (or to this model) in the requested order."""
