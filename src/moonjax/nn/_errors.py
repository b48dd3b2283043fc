"""Errors raised by ``moonjax.nn`` and ``moonjax.models``."""

from __future__ import annotations

from moonjax._src.errors import MoonjaxError


class ShapeError(MoonjaxError, ValueError):
    """An input's shape does not fit an invertible layer (wrong channels, odd size, ...)."""


class ConfigError(MoonjaxError, ValueError):
    """A layer was constructed with arguments that cannot give an invertible map."""
