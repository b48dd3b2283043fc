"""Side networks: the free (non-invertible) functions that couplings add or scale by."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx


class MLP(nnx.Module):
    """A two-layer perceptron ``Dense(out) ∘ act ∘ Dense(hidden)`` on the last axis.

    It is the default side network of the couplings. A side network reads the spine and
    feeds a spine primitive's other operand; Moonwalk differentiates it locally with
    reverse mode, so it need not be invertible.

    Args:
      in_features: input width.
      hidden: hidden width.
      out_features: output width.
      rngs: random streams for the initialisers.
      activation: the nonlinearity (default ``jax.nn.gelu``; ``jnp.tanh`` also works).
      param_dtype: dtype of the parameters.
      zero_out: initialise the output layer to zero, so the network starts at 0 (the
        couplings' default: each starts at its identity or a fixed scale, as in Glow,
        and a deep stack inverts to float rounding at initialisation).

    Example:
      >>> mlp = MLP(4, 16, 4, rngs=nnx.Rngs(0))
      >>> mlp(jnp.ones((2, 4))).shape
      (2, 4)
    """

    def __init__(
        self,
        in_features: int,
        hidden: int,
        out_features: int,
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu,
        param_dtype: jnp.dtype = jnp.float32,
        zero_out: bool = False,
    ):
        self.hidden = nnx.Linear(in_features, hidden, rngs=rngs, param_dtype=param_dtype)
        init = {"kernel_init": nnx.initializers.zeros_init()} if zero_out else {}
        self.out = nnx.Linear(hidden, out_features, rngs=rngs, param_dtype=param_dtype,
                              **init)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.activation(self.hidden(x)))


class ConvNet(nnx.Module):
    """A two-layer 3x3 convolutional side network on NHWC input (``SAME`` padding).

    Args:
      in_channels: input channels.
      hidden: hidden channels.
      out_channels: output channels.
      rngs: random streams for the initialisers.
      activation: the nonlinearity (default ``jax.nn.gelu``).
      kernel_size: spatial kernel size of both convolutions.
      param_dtype: dtype of the parameters.

    Example:
      >>> net = ConvNet(2, 8, 2, rngs=nnx.Rngs(0))
      >>> net(jnp.ones((1, 4, 4, 2))).shape
      (1, 4, 4, 2)
    """

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        out_channels: int,
        *,
        rngs: nnx.Rngs,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.gelu,
        kernel_size: int = 3,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        k = (kernel_size, kernel_size)
        self.hidden = nnx.Conv(
            in_channels, hidden, k, padding="SAME", rngs=rngs, param_dtype=param_dtype
        )
        self.out = nnx.Conv(
            hidden, out_channels, k, padding="SAME", rngs=rngs, param_dtype=param_dtype
        )
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.activation(self.hidden(x)))
