"""Glow's activation normalisation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moonjax.nn._base import Invertible, check_features, constant_per_example
from moonjax.nn._errors import ConfigError


class ActNorm(Invertible):
    """Per-channel affine normalisation ``y = x * exp(log_scale) + bias`` (Glow).

    ``log|det J| = Σ log_scale`` per feature vector (times ``H*W`` on images). The
    parameters start at the identity. **Data-dependent initialisation is explicit**: call
    ``initialize`` once on a representative batch *outside* the loss; it sets ``bias``
    and ``log_scale`` so the outputs on that batch have zero mean and unit variance per
    channel and returns them. ``__call__`` never changes state, so an un-initialised
    ActNorm is simply an identity map (no hidden "first call" flag).

    Args:
      features: number of channels (last axis).
      rngs: accepted for a uniform constructor signature; unused.
      eps: added to the standard deviation in ``initialize``.
      param_dtype: dtype of the parameters.

    Example:
      >>> norm = ActNorm(3)
      >>> x = 5.0 + 2.0 * jax.random.normal(jax.random.key(0), (64, 3))
      >>> y = norm.initialize(x)
      >>> bool(jnp.allclose(y.mean(0), 0.0, atol=1e-5))
      True
    """

    def __init__(
        self,
        features: int,
        *,
        rngs: nnx.Rngs | None = None,
        eps: float = 1e-6,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        del rngs
        if not isinstance(features, int) or features < 1:
            raise ConfigError(f"ActNorm needs a positive integer `features`; got {features!r}")
        self.features = features
        self.eps = float(eps)
        self.log_scale = nnx.Param(jnp.zeros((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        check_features(self, x, self.features)
        return x * jnp.exp(self.log_scale[...]) + self.bias[...]

    def inverse(self, y: jax.Array) -> jax.Array:
        check_features(self, y, self.features)
        return (y - self.bias[...]) * jnp.exp(-self.log_scale[...])

    def log_det(self, x: jax.Array) -> jax.Array:
        return constant_per_example(x, jnp.sum(self.log_scale[...]))

    def initialize(self, x: jax.Array) -> jax.Array:
        """Set the parameters from the batch ``x`` (zero mean, unit variance); return ``y``."""
        check_features(self, x, self.features)
        axes = tuple(range(x.ndim - 1))
        mean = jnp.mean(x, axis=axes)
        std = jnp.std(x, axis=axes)
        dtype = self.log_scale[...].dtype
        log_scale = -jnp.log(std + self.eps)
        self.log_scale[...] = log_scale.astype(dtype)
        self.bias[...] = (-mean * jnp.exp(log_scale)).astype(dtype)
        return self(x)
