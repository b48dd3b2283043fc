"""The protocol every invertible module follows, and shape helpers shared by them."""

from __future__ import annotations

import math
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from moonjax.nn._errors import ShapeError


class Invertible(nnx.Module):
    """Base class of the invertible modules in ``moonjax.nn``.

    A subclass maps ``x -> y`` in ``__call__`` and back in ``inverse``. Inputs carry a
    leading batch axis and a trailing feature (channel) axis: ``(batch, ..., features)``.

    * ``log_det(x)``: ``log |det ∂y/∂x|`` per example, shape ``(x.shape[0],)`` (a scalar
      for 1-D input). Volume-preserving layers set ``volume_preserving = True`` and
      inherit a zero log-det.
    * ``forward_and_log_det(x)``: ``(y, log_det)`` in one pass; override when cheaper.
    * ``initialize(x)``: data-dependent initialisation (see ``ActNorm``); returns
      ``y``. The default only calls the layer. ``__call__`` never mutates state, so it is
      safe under ``jax.jit``, ``jax.grad``, ``lax.scan`` and ``moonjax.moonwalk_grad``.
    """

    volume_preserving: ClassVar[bool] = False

    def __call__(self, x: jax.Array) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} does not define __call__")

    def inverse(self, y: jax.Array) -> jax.Array:
        raise NotImplementedError(f"{type(self).__name__} does not define inverse")

    def log_det(self, x: jax.Array) -> jax.Array:
        if self.volume_preserving:
            return zeros_per_example(x)
        raise NotImplementedError(
            f"{type(self).__name__} does not define log_det; override log_det or "
            "forward_and_log_det to use it in a normalising flow"
        )

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self(x), self.log_det(x)

    def initialize(self, x: jax.Array) -> jax.Array:
        return self(x)


def initialize(module, x: jax.Array) -> jax.Array:
    """Run ``module.initialize(x)`` if it has one, else ``module(x)``; return the output."""
    init = getattr(module, "initialize", None)
    return init(x) if callable(init) else module(x)


def positions_per_example(x: jax.Array) -> int:
    """How many feature vectors one example holds (``H*W`` for NHWC, 1 for ``(B, D)``)."""
    return math.prod(x.shape[1:-1]) if x.ndim >= 2 else 1


def zeros_per_example(x: jax.Array) -> jax.Array:
    """A zero log-det with the per-example shape."""
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return jnp.zeros(x.shape[:1] if x.ndim >= 2 else (), dtype)


def sum_per_example(v: jax.Array) -> jax.Array:
    """Sum an elementwise log-det over every axis but the leading batch axis."""
    if v.ndim <= 1:
        return jnp.sum(v)
    return jnp.sum(v, axis=tuple(range(1, v.ndim)))


def constant_per_example(x: jax.Array, value: jax.Array) -> jax.Array:
    """A per-feature-vector log-det ``value`` (scalar), times positions, per example."""
    total = value * positions_per_example(x)
    return jnp.broadcast_to(total, x.shape[:1] if x.ndim >= 2 else ()).astype(
        jnp.result_type(total, x.dtype)
    )


def check_features(layer: object, x: jax.Array, features: int) -> None:
    """Raise ``ShapeError`` unless ``x``'s last axis has ``features`` entries."""
    if x.ndim == 0 or x.shape[-1] != features:
        got = "a scalar" if x.ndim == 0 else f"{x.shape[-1]} features"
        raise ShapeError(
            f"{type(layer).__name__}(features={features}) got {got} (input shape "
            f"{tuple(x.shape)}); the last axis must have {features} entries"
        )
