"""Errors raised by ``moonjax.train``."""

from __future__ import annotations

from moonjax._src.errors import MoonjaxError


class DataError(MoonjaxError, ValueError):
    """A data set cannot be used for training: missing file, wrong keys, shapes or labels."""


class CheckpointError(MoonjaxError, ValueError):
    """A checkpoint cannot be restored into this run (other model, data or optimizer)."""
