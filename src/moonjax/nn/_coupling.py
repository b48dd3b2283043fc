"""Coupling layers: additive (NICE), affine (RealNVP / Glow) and RevNet residual blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moonjax.nn._base import Invertible, check_features, sum_per_example
from moonjax.nn._errors import ConfigError
from moonjax.nn._side import MLP


def _check_even(layer_name: str, features: int) -> int:
    if not isinstance(features, int) or features < 2 or features % 2:
        raise ConfigError(
            f"{layer_name} splits the last axis into two equal halves, so `features` must "
            f"be an even integer >= 2; got {features!r}. Pad the input to an even width "
            "(e.g. concatenate a zero channel before the first layer)."
        )
    return features // 2


def _init_coupling(layer, features, hidden, outputs, rngs, side, param_dtype) -> None:
    """Check ``features`` and give ``layer`` its side network: ``side``, or an MLP from
    one half to ``outputs`` halves whose output layer starts at zero (the coupling starts
    at its identity, or its fixed scale: deep stacks invert exactly at initialisation)."""
    half = _check_even(type(layer).__name__, features)
    layer.features = features
    layer.side = side if side is not None else MLP(half, hidden, outputs * half, rngs=rngs,
                                                   param_dtype=param_dtype, zero_out=True)


class AdditiveCoupling(Invertible):
    """Additive coupling ``y = [x2 + f(x1), x1]`` (NICE), volume preserving.

    With ``x1, x2 = split(x, 2, axis=-1)`` the layer outputs
    ``concatenate([x2 + f(x1), x1], -1)``; the halves swap, so stacked couplings take
    turns. Its inverse is ``x1 = y2``, ``x2 = y1 - f(y2)`` and ``log|det J| = 0``.
    The side network ``f`` can be any module mapping ``(..., features/2)`` to
    ``(..., features/2)``.

    Args:
      features: width of the last axis (even).
      hidden: hidden width of the default side network (an ``MLP``).
      rngs: random streams for the initialisers.
      side: a custom side network; overrides ``hidden``.
      param_dtype: dtype of the parameters.

    Example:
      >>> layer = AdditiveCoupling(4, 16, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 4))
      >>> jnp.allclose(layer.inverse(layer(x)), x, atol=1e-6)
      Array(True, dtype=bool)
    """

    volume_preserving = True

    def __init__(self, features: int, hidden: int = 64, *, rngs: nnx.Rngs,
                 side: nnx.Module | None = None, param_dtype: jnp.dtype = jnp.float32):
        _init_coupling(self, features, hidden, 1, rngs, side, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        check_features(self, x, self.features)
        x1, x2 = jnp.split(x, 2, axis=-1)
        return jnp.concatenate([x2 + self.side(x1), x1], axis=-1)

    def inverse(self, y: jax.Array) -> jax.Array:
        check_features(self, y, self.features)
        y1, y2 = jnp.split(y, 2, axis=-1)
        return jnp.concatenate([y2, y1 - self.side(y2)], axis=-1)


class AffineCoupling(Invertible):
    """Affine coupling ``y = [x2 * σ(s(x1) + 2) + t(x1), x1]`` (RealNVP / Glow).

    With ``x1, x2 = split(x, 2, axis=-1)`` and ``s, t = split(side(x1), 2, axis=-1)``, the
    scale is ``sigmoid(s + 2)``: in ``(0, 1)``, never zero, and near ``0.88`` at
    initialisation, which keeps deep flows stable. The output is
    ``concatenate([y2, x1], -1)``; the inverse is ``x1 = y2``,
    ``x2 = (y1 - t(y2)) / scale(y2)``, and ``log|det J| = Σ log sigmoid(s + 2)``, available
    through ``log_det`` and ``forward_and_log_det`` (``__call__`` returns ``y``
    only). The side network maps ``(..., features/2)`` to ``(..., features)``.

    Args:
      features: width of the last axis (even).
      hidden: hidden width of the default side network (an ``MLP``).
      rngs: random streams for the initialisers.
      side: a custom side network producing ``[s, t]``; overrides ``hidden``.
      param_dtype: dtype of the parameters.

    Example:
      >>> layer = AffineCoupling(4, 16, rngs=nnx.Rngs(0))
      >>> y, log_det = layer.forward_and_log_det(jnp.ones((2, 4)))
      >>> log_det.shape
      (2,)
    """

    def __init__(self, features: int, hidden: int = 64, *, rngs: nnx.Rngs,
                 side: nnx.Module | None = None, param_dtype: jnp.dtype = jnp.float32):
        _init_coupling(self, features, hidden, 2, rngs, side, param_dtype)

    def _scale_shift(self, x1: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        s, t = jnp.split(self.side(x1), 2, axis=-1)
        return jax.nn.sigmoid(s + 2.0), t, s

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        check_features(self, x, self.features)
        x1, x2 = jnp.split(x, 2, axis=-1)
        scale, shift, s = self._scale_shift(x1)
        y = jnp.concatenate([x2 * scale + shift, x1], axis=-1)
        return y, sum_per_example(jax.nn.log_sigmoid(s + 2.0))

    def __call__(self, x: jax.Array) -> jax.Array:
        check_features(self, x, self.features)
        x1, x2 = jnp.split(x, 2, axis=-1)
        scale, shift, _ = self._scale_shift(x1)
        return jnp.concatenate([x2 * scale + shift, x1], axis=-1)

    def log_det(self, x: jax.Array) -> jax.Array:
        return self.forward_and_log_det(x)[1]

    def inverse(self, y: jax.Array) -> jax.Array:
        check_features(self, y, self.features)
        y1, y2 = jnp.split(y, 2, axis=-1)
        scale, shift, _ = self._scale_shift(y2)
        return jnp.concatenate([y2, (y1 - shift) / scale], axis=-1)


class RevBlock(Invertible):
    """RevNet residual block: ``y1 = x1 + F(x2)``, ``y2 = x2 + G(y1)``, volume preserving.

    With ``x1, x2 = split(x, 2, axis=-1)`` the output is ``concatenate([y1, y2], -1)``. The
    inverse runs the two steps backwards, ``x2 = y2 - G(y1)``, ``x1 = y1 - F(x2)``, and
    ``log|det J| = 0``. ``F`` and ``G`` are arbitrary modules (or callables) mapping
    ``(..., features/2)`` to ``(..., features/2)``; a reversible transformer block uses
    attention for ``F`` and an MLP for ``G``.

    Args:
      features: width of the last axis (even).
      F: the first residual branch.
      G: the second residual branch.

    Example:
      >>> rngs = nnx.Rngs(0)
      >>> block = RevBlock(4, MLP(2, 8, 2, rngs=rngs), MLP(2, 8, 2, rngs=rngs))
      >>> block(jnp.ones((3, 4))).shape
      (3, 4)
    """

    volume_preserving = True

    def __init__(self, features: int, F: nnx.Module, G: nnx.Module):  # noqa: N803
        _check_even(type(self).__name__, features)
        self.features = features
        self.F = F
        self.G = G

    def __call__(self, x: jax.Array) -> jax.Array:
        check_features(self, x, self.features)
        x1, x2 = jnp.split(x, 2, axis=-1)
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return jnp.concatenate([y1, y2], axis=-1)

    def inverse(self, y: jax.Array) -> jax.Array:
        check_features(self, y, self.features)
        y1, y2 = jnp.split(y, 2, axis=-1)
        x2 = y2 - self.G(y1)
        x1 = y1 - self.F(x2)
        return jnp.concatenate([x1, x2], axis=-1)
