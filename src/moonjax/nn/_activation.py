"""Invertible elementwise nonlinearities."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moonjax.nn._base import Invertible, sum_per_example
from moonjax.nn._errors import ConfigError


class LeakyReLU(Invertible):
    """Leaky ReLU ``y = x if x >= 0 else slope * x``, invertible for ``slope > 0``.

    The inverse divides the negative part by the slope, and per example
    ``log|det J| = (number of negative entries) * log(slope)``. Implemented with
    ``jax.nn.leaky_relu``, which Moonwalk's sweep treats as one elementwise map.

    Args:
      negative_slope: the slope for negative inputs; must be ``> 0``.

    Example:
      >>> act = LeakyReLU(0.2)
      >>> act(jnp.array([-1.0, 2.0]))
      Array([-0.2,  2. ], dtype=float32)
    """

    def __init__(self, negative_slope: float = 0.2):
        slope = float(negative_slope)
        if not np.isfinite(slope) or slope <= 0.0:
            raise ConfigError(
                f"LeakyReLU is invertible only for negative_slope > 0; got {negative_slope!r}. "
                "A slope of 0 is a plain ReLU, which erases information."
            )
        self.negative_slope = slope

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.leaky_relu(x, negative_slope=self.negative_slope)

    def inverse(self, y: jax.Array) -> jax.Array:
        return jnp.where(y >= 0, y, y / self.negative_slope)

    def log_det(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
        per_entry = jnp.where(x >= 0, 0.0, np.log(self.negative_slope)).astype(dtype)
        return sum_per_example(per_entry)
