"""Invertible linear layers: an LU-parameterised dense layer and Glow's 1x1 convolution."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.scipy.linalg import solve_triangular

from moonjax.nn._base import Invertible, check_features, constant_per_example
from moonjax.nn._errors import ConfigError


def _check_width(name: str, features: int) -> None:
    if not isinstance(features, int) or features < 1:
        raise ConfigError(f"{name} needs a positive integer width; got {features!r}")


def _permutation(name: str, features: int, permutation: Sequence[int] | None) -> tuple[int, ...]:
    if permutation is None:
        return tuple(range(features - 1, -1, -1))
    perm = tuple(int(i) for i in permutation)
    if sorted(perm) != list(range(features)):
        raise ConfigError(
            f"{name}: `permutation` must be a permutation of range({features}); got {perm}"
        )
    return perm


def _apply(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis of ``x``: exactly one ``dot_general``."""
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _rows(y: jax.Array) -> jax.Array:
    """``y`` as a matrix with one feature vector per column (for triangular solves)."""
    return y.reshape(-1, y.shape[-1]).T


class _LULinear(Invertible):
    """Shared LU parameterisation ``W = P @ L @ U`` of a square matrix.

    ``P`` is a fixed permutation (static: a constant of the graph, not a parameter), ``L``
    is unit lower-triangular (``tril(lower, -1) + I``) and ``U`` is upper-triangular with
    diagonal ``sign * exp(log_s)``, so ``W`` is invertible for every parameter value and
    ``log|det W| = Σ log_s``. The signs are fixed to ``+1``: a diagonal entry can never
    cross zero during training anyway, and ``P`` already fixes the sign of ``det W``. The
    parameters start near the identity (off-diagonal entries ``~ N(0, (0.5/√n)²)``),
    which keeps ``cond(W)`` around 4 at any width.
    """

    def _init_lu(
        self,
        name: str,
        features: int,
        rngs: nnx.Rngs,
        permutation: Sequence[int] | None,
        param_dtype: jnp.dtype,
    ) -> None:
        _check_width(name, features)
        self.features = features
        self.permutation = _permutation(name, features, permutation)
        std = 0.5 / math.sqrt(features)  # a Python float keeps param_dtype under x64
        shape = (features, features)
        self.lower = nnx.Param(std * jax.random.normal(rngs.params(), shape, param_dtype))
        self.upper = nnx.Param(std * jax.random.normal(rngs.params(), shape, param_dtype))
        self.log_s = nnx.Param(jnp.zeros((features,), param_dtype))

    def _factors(self) -> tuple[np.ndarray, jax.Array, jax.Array]:
        n = self.features
        dtype = self.lower[...].dtype
        perm = np.eye(n, dtype=dtype)[list(self.permutation)]
        eye = jnp.eye(n, dtype=dtype)
        lower = jnp.tril(self.lower[...], -1) + eye
        upper = jnp.triu(self.upper[...], 1) + eye * jnp.exp(self.log_s[...])
        return perm, lower, upper

    def _lu_weight(self) -> jax.Array:
        perm, lower, upper = self._factors()
        return perm @ (lower @ upper)

    def _lu_solve(self, y: jax.Array) -> jax.Array:
        """Solve ``x @ P L U = y`` for ``x`` with two triangular solves."""
        perm, lower, upper = self._factors()
        a = solve_triangular(upper, _rows(y), trans="T", lower=False)  # (x P L) U = y
        b = solve_triangular(lower, a, trans="T", lower=True, unit_diagonal=True)  # (x P) L = a
        return (b.T @ perm.T).reshape(y.shape)  # x = (x P) Pᵀ


class InvertibleDense(_LULinear):
    """An invertible dense layer ``y = x @ W + b`` with ``W = P @ L @ U`` (LU form).

    ``P`` is a fixed permutation (default: reverse the features), ``L`` unit
    lower-triangular and ``U`` upper-triangular with diagonal ``exp(log_s)``, so ``W`` is
    never singular, ``log|det W| = Σ log_s``, and the inverse is two triangular solves
    (``jax.scipy.linalg.solve_triangular``). The forward pass is a single ``dot_general``
    of ``x`` with ``W`` (built from the parameters alone). Acts on the last axis, so it
    works on ``(batch, features)`` and on NHWC images alike (there it equals
    ``InvertibleConv1x1`` plus a bias).

    Args:
      features: width of the last axis.
      rngs: random streams for the initialisers.
      use_bias: add a learned bias ``b`` (default ``True``).
      permutation: the fixed permutation ``P`` as a sequence of indices.
      param_dtype: dtype of the parameters.

    Example:
      >>> layer = InvertibleDense(3, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((2, 3))
      >>> jnp.allclose(layer.inverse(layer(x)), x, atol=1e-5)
      Array(True, dtype=bool)
    """

    def __init__(
        self,
        features: int,
        *,
        rngs: nnx.Rngs,
        use_bias: bool = True,
        permutation: Sequence[int] | None = None,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self._init_lu("InvertibleDense", features, rngs, permutation, param_dtype)
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype)) if use_bias else None

    @property
    def weight(self) -> jax.Array:
        """The matrix ``W = P @ L @ U``."""
        return self._lu_weight()

    def __call__(self, x: jax.Array) -> jax.Array:
        check_features(self, x, self.features)
        y = _apply(x, self._lu_weight())
        return y if self.bias is None else y + self.bias[...]

    def inverse(self, y: jax.Array) -> jax.Array:
        check_features(self, y, self.features)
        if self.bias is not None:
            y = y - self.bias[...]
        return self._lu_solve(y)

    def log_det(self, x: jax.Array) -> jax.Array:
        return constant_per_example(x, jnp.sum(self.log_s[...]))


class InvertibleConv1x1(_LULinear):
    """Glow's invertible 1x1 convolution: ``y[..., d] = Σ_c x[..., c] W[c, d]`` on NHWC.

    A square channel-mixing matrix applied at every pixel (one ``dot_general`` over the
    channel axis). With ``lu=True`` (default) ``W = P @ L @ U`` as in
    ``InvertibleDense``; with ``lu=False`` ``W`` is a free matrix initialised to a
    random rotation and inverted with ``jnp.linalg.solve``. Per image
    ``log|det J| = H * W * log|det W|``.

    Args:
      channels: number of channels (last axis).
      rngs: random streams for the initialisers.
      lu: use the LU parameterisation (never singular, cheap log-det).
      permutation: the fixed permutation ``P`` when ``lu=True``.
      param_dtype: dtype of the parameters.

    Example:
      >>> conv = InvertibleConv1x1(3, rngs=nnx.Rngs(0))
      >>> conv.log_det(jnp.ones((2, 4, 4, 3))).shape
      (2,)
    """

    def __init__(
        self,
        channels: int,
        *,
        rngs: nnx.Rngs,
        lu: bool = True,
        permutation: Sequence[int] | None = None,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.lu = bool(lu)
        if self.lu:
            self._init_lu("InvertibleConv1x1", channels, rngs, permutation, param_dtype)
            self.kernel = None
        else:
            _check_width("InvertibleConv1x1", channels)
            if permutation is not None:
                raise ConfigError("InvertibleConv1x1: `permutation` only applies with lu=True")
            self.features = channels
            init = jax.nn.initializers.orthogonal()
            self.kernel = nnx.Param(init(rngs.params(), (channels, channels), param_dtype))

    @property
    def weight(self) -> jax.Array:
        """The channel-mixing matrix ``W``."""
        return self._lu_weight() if self.lu else self.kernel[...]

    def __call__(self, x: jax.Array) -> jax.Array:
        check_features(self, x, self.features)
        return _apply(x, self.weight)

    def inverse(self, y: jax.Array) -> jax.Array:
        check_features(self, y, self.features)
        if self.lu:
            return self._lu_solve(y)
        return jnp.linalg.solve(self.kernel[...].T, _rows(y)).T.reshape(y.shape)

    def log_det(self, x: jax.Array) -> jax.Array:
        if self.lu:
            value = jnp.sum(self.log_s[...])
        else:
            value = jnp.linalg.slogdet(self.kernel[...])[1]
        return constant_per_example(x, value)
