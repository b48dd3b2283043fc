"""A Glow-style normalising flow."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from moonjax.nn import (
    ActNorm,
    AffineCoupling,
    ConfigError,
    ConvNet,
    InvertibleConv1x1,
    InvertibleDense,
    Sequential,
    ShapeError,
    Squeeze,
    Stack,
)
from moonjax.nn._base import sum_per_example


class GlowFlow(nnx.Module):
    """A Glow-style flow ``x -> z`` with a standard normal base distribution.

    ``depth`` steps of ``ActNorm -> invertible linear mixing -> AffineCoupling``, stacked
    with ``Stack``. For flat data ``(batch, D)`` the mixing is an
    ``InvertibleDense`` (no bias); for images ``(batch, H, W, C)`` the
    flow first squeezes 2x2 and mixes with an ``InvertibleConv1x1``, and
    the couplings use a 3x3 ``ConvNet``. By the change of variables,
    ``log p(x) = log N(z; 0, I) + log|det ∂z/∂x|``. Call ``initialize`` once on a data
    batch (ActNorm's data-dependent initialisation) before training.

    Args:
      event_shape: ``D`` (an even int) for flat data, or ``(H, W, C)`` for images.
      rngs: random streams.
      depth: number of flow steps.
      hidden: hidden width of the coupling side networks.
      param_dtype: dtype of the parameters.

    Example:
      >>> flow = GlowFlow(4, rngs=nnx.Rngs(0))
      >>> z = flow.initialize(jax.random.normal(jax.random.key(0), (64, 4)))
      >>> flow.log_prob(jnp.ones((2, 4))).shape
      (2,)
      >>> flow.sample(jax.random.key(1), 5).shape
      (5, 4)
    """

    def __init__(
        self,
        event_shape: int | Sequence[int],
        *,
        rngs: nnx.Rngs,
        depth: int = 4,
        hidden: int = 32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        kw = dict(param_dtype=param_dtype)
        self.param_dtype = jnp.dtype(param_dtype)
        if isinstance(event_shape, int):
            self.event_shape = (event_shape,)
            if event_shape < 2 or event_shape % 2:
                raise ConfigError(
                    f"GlowFlow on flat data needs an even dimension >= 2 (the couplings "
                    f"split it in halves); got {event_shape}"
                )
            d = event_shape
            self.latent_shape = self.event_shape

            def step(r: nnx.Rngs) -> Sequential:
                return Sequential(
                    ActNorm(d, **kw),
                    InvertibleDense(d, rngs=r, use_bias=False, **kw),
                    AffineCoupling(d, hidden, rngs=r, **kw),
                )

            self.squeeze = None
        else:
            self.event_shape = tuple(int(s) for s in event_shape)
            if len(self.event_shape) != 3:
                raise ConfigError(
                    f"GlowFlow event_shape must be D or (H, W, C); got {event_shape!r}"
                )
            h, w, c = self.event_shape
            if h % 2 or w % 2:
                raise ShapeError(
                    f"GlowFlow squeezes images 2x2: H and W must be even; got {h}, {w}"
                )
            d = 4 * c
            self.latent_shape = (h // 2, w // 2, d)

            def step(r: nnx.Rngs) -> Sequential:
                side = ConvNet(d // 2, hidden, d, rngs=r, **kw)
                return Sequential(
                    ActNorm(d, **kw),
                    InvertibleConv1x1(d, rngs=r, **kw),
                    AffineCoupling(d, rngs=r, side=side, **kw),
                )

            self.squeeze = Squeeze(2)
        self.steps = Stack(step, depth, rngs=rngs)

    def _check(self, x: jax.Array) -> None:
        if tuple(x.shape[1:]) != self.event_shape:
            raise ShapeError(
                f"GlowFlow expects (batch, *{self.event_shape}) input; got {tuple(x.shape)}"
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        """The latent ``z`` of ``x``."""
        return self.forward_and_log_det(x)[0]

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``(z, log|det ∂z/∂x|)`` with one log-det per example."""
        self._check(x)
        if self.squeeze is not None:
            x = self.squeeze(x)
        return self.steps.forward_and_log_det(x)

    def inverse(self, z: jax.Array) -> jax.Array:
        """The data point ``x`` of a latent ``z`` (shape ``(batch, *latent_shape)``)."""
        x = self.steps.inverse(z)
        return x if self.squeeze is None else self.squeeze.inverse(x)

    def log_prob(self, x: jax.Array) -> jax.Array:
        """``log p(x)`` per example, in nats."""
        z, log_det = self.forward_and_log_det(x)
        dim = math.prod(self.event_shape)
        base = -0.5 * sum_per_example(z * z) - 0.5 * dim * math.log(2 * math.pi)
        return base + log_det

    def sample(self, key: jax.Array, n: int) -> jax.Array:
        """``n`` samples ``x = inverse(z)``, ``z ~ N(0, I)``."""
        z = jax.random.normal(key, (n, *self.latent_shape), self.param_dtype)
        return self.inverse(z)

    def initialize(self, x: jax.Array) -> jax.Array:
        """ActNorm's data-dependent initialisation on the batch ``x``; returns ``z``."""
        self._check(x)
        if self.squeeze is not None:
            x = self.squeeze(x)
        return self.steps.initialize(x)


def flow_loss(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """The mean negative log-likelihood per dimension ``loss(params, x)`` of a flow (nats).

    Example:
      >>> flow = GlowFlow(4, depth=2, rngs=nnx.Rngs(0))
      >>> x = jax.random.normal(jax.random.key(0), (16, 4))
      >>> _ = flow.initialize(x)
      >>> graphdef, params = nnx.split(flow)
      >>> grads = jax.grad(flow_loss(graphdef))(params, x)
    """

    def loss(params: nnx.State, x: jax.Array) -> jax.Array:
        flow = nnx.merge(graphdef, params)
        return -jnp.mean(flow.log_prob(x)) / math.prod(flow.event_shape)

    return loss
