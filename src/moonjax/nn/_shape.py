"""Volume-preserving rearrangements: space-to-depth and channel permutations.

All are reshapes, transposes and reversals (no ``gather``), the structural moves that
Moonwalk's sweep applies to cotangents as they are.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moonjax.nn._base import Invertible
from moonjax.nn._errors import ConfigError, ShapeError


class Squeeze(Invertible):
    """Space-to-depth on NHWC input (i-RevNet / RealNVP squeeze), volume preserving.

    ``(..., H, W, C) -> (..., H/f, W/f, f*f*C)``: each ``f x f`` patch becomes one pixel
    with the patch entries stacked on the channel axis, in order ``(row, column,
    channel)``. It is one reshape, one transpose and one reshape; the inverse
    (depth-to-space) runs the same moves backwards. ``H`` and ``W`` must be divisible by
    ``f``.

    Args:
      factor: the patch size ``f`` (an integer >= 1).

    Example:
      >>> Squeeze(2)(jnp.ones((1, 4, 6, 3))).shape
      (1, 2, 3, 12)
    """

    volume_preserving = True

    def __init__(self, factor: int = 2):
        if not isinstance(factor, int) or factor < 1:
            raise ConfigError(f"Squeeze needs an integer factor >= 1; got {factor!r}")
        self.factor = factor

    def __call__(self, x: jax.Array) -> jax.Array:
        f = self.factor
        if x.ndim < 3:
            raise ShapeError(
                f"Squeeze expects (..., H, W, C) input with at least 3 axes; got shape "
                f"{tuple(x.shape)}"
            )
        *lead, h, w, c = x.shape
        if h % f or w % f:
            raise ShapeError(
                f"Squeeze(factor={f}) needs H and W divisible by {f}; got H={h}, W={w} "
                f"(input shape {tuple(x.shape)}). Pad or crop the image first."
            )
        n = len(lead)
        x = x.reshape(*lead, h // f, f, w // f, f, c)
        x = jnp.transpose(x, (*range(n), n, n + 2, n + 1, n + 3, n + 4))
        return x.reshape(*lead, h // f, w // f, f * f * c)

    def inverse(self, y: jax.Array) -> jax.Array:
        f = self.factor
        if y.ndim < 3 or y.shape[-1] % (f * f):
            raise ShapeError(
                f"Squeeze(factor={f}).inverse expects (..., H, W, C) with C divisible by "
                f"{f * f}; got shape {tuple(y.shape)}"
            )
        *lead, h, w, cc = y.shape
        n = len(lead)
        y = y.reshape(*lead, h, w, f, f, cc // (f * f))
        y = jnp.transpose(y, (*range(n), n, n + 2, n + 1, n + 3, n + 4))
        return y.reshape(*lead, h * f, w * f, cc // (f * f))


class Reverse(Invertible):
    """Reverse the order of the channels (last axis): ``y = flip(x, -1)``; its own inverse.

    Example:
      >>> Reverse()(jnp.array([1.0, 2.0, 3.0]))
      Array([3., 2., 1.], dtype=float32)
    """

    volume_preserving = True

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.flip(x, axis=-1)

    def inverse(self, y: jax.Array) -> jax.Array:
        return jnp.flip(y, axis=-1)


class ChannelShuffle(Invertible):
    """ShuffleNet channel shuffle with ``groups`` groups, volume preserving.

    The channel axis ``C = g * k`` is read as a ``(g, k)`` grid and written out transposed
    as ``(k, g)``: reshape, transpose, reshape. The inverse reads ``(k, g)`` and writes
    ``(g, k)``. ``C`` must be divisible by ``groups``.

    Args:
      groups: the number of groups ``g`` (an integer >= 1).

    Example:
      >>> ChannelShuffle(2)(jnp.arange(6.0))
      Array([0., 3., 1., 4., 2., 5.], dtype=float32)
    """

    volume_preserving = True

    def __init__(self, groups: int):
        if not isinstance(groups, int) or groups < 1:
            raise ConfigError(f"ChannelShuffle needs an integer groups >= 1; got {groups!r}")
        self.groups = groups

    def _check(self, x: jax.Array) -> None:
        if x.ndim == 0 or x.shape[-1] % self.groups:
            raise ShapeError(
                f"ChannelShuffle(groups={self.groups}) needs the channel count (last axis) "
                f"divisible by {self.groups}; got input shape {tuple(x.shape)}"
            )

    def _regroup(self, x: jax.Array, rows: int) -> jax.Array:
        *lead, c = x.shape
        x = x.reshape(*lead, rows, c // rows)
        return jnp.swapaxes(x, -1, -2).reshape(*lead, c)

    def __call__(self, x: jax.Array) -> jax.Array:
        self._check(x)
        return self._regroup(x, self.groups)

    def inverse(self, y: jax.Array) -> jax.Array:
        self._check(y)
        return self._regroup(y, y.shape[-1] // self.groups)
