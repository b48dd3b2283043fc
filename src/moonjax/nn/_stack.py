"""Composition: a Python-level ``Sequential`` and a scanned, depth-stacked ``Stack``."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from moonjax.nn._base import Invertible, initialize, zeros_per_example
from moonjax.nn._errors import ConfigError


class Sequential(Invertible):
    """Compose invertible layers: ``y = f_n(... f_1(x))``, inverted in reverse order.

    ``log|det J|`` is the sum of the layers' log-dets (each evaluated at its own input).
    ``initialize`` runs every layer's data-dependent initialisation in order, feeding
    each the previous layer's initialised output.

    Args:
      *layers: invertible modules, applied first to last.

    Example:
      >>> from moonjax import nn
      >>> model = nn.Sequential(nn.Squeeze(2), nn.Reverse())
      >>> x = jnp.ones((1, 4, 4, 1))
      >>> model.inverse(model(x)).shape
      (1, 4, 4, 1)
    """

    def __init__(self, *layers: nnx.Module):
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x

    def inverse(self, y: jax.Array) -> jax.Array:
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        total = zeros_per_example(x)
        for layer in self.layers:
            x, log_det = layer.forward_and_log_det(x)
            total = total + log_det
        return x, total

    def log_det(self, x: jax.Array) -> jax.Array:
        return self.forward_and_log_det(x)[1]

    def initialize(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = initialize(layer, x)
        return x


class Stack(Invertible):
    """``depth`` copies of one layer with stacked parameters, run by ``jax.lax.scan``.

    ``make_layer(rngs)`` builds one layer; ``Stack`` builds all ``depth`` of them at
    once with ``jax.vmap`` over split keys, so every parameter gets a leading axis of size
    ``depth``, and runs ``h_i = layer_i(h_{i-1})`` as one ``lax.scan`` whose carry is the
    activation alone and whose scanned inputs are the per-layer parameters. The traced
    program therefore has the same size at depth 10 and depth 1000 (compile time does
    not grow with depth), and it is the scan-over-parameters form that
    ``moonjax.moonwalk_grad`` sweeps. ``inverse`` scans the layers in reverse;
    ``forward_and_log_det`` emits each layer's log-det as a scanned output and sums them.

    The layers must be pure functions of their parameters: every variable must be an
    ``nnx.Param`` (no RNG streams, counters or batch statistics), and ``make_layer`` must
    build the same structure for every key.

    Args:
      make_layer: ``rngs -> module``; the module should follow ``Invertible``.
      depth: the number of layers (>= 1).
      rngs: random streams; one key is split into ``depth`` layer keys.

    Example:
      >>> from moonjax import nn
      >>> stack = nn.Stack(lambda r: nn.AdditiveCoupling(4, 8, rngs=r), 100, rngs=nnx.Rngs(0))
      >>> stack.layers.side.hidden.kernel.shape
      (100, 2, 8)
    """

    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], depth: int, *, rngs: nnx.Rngs):
        if not isinstance(depth, int) or depth < 1:
            raise ConfigError(f"Stack needs an integer depth >= 1; got {depth!r}")
        self.depth = depth
        template = nnx.eval_shape(lambda: make_layer(nnx.Rngs(0)))
        graphdef = nnx.graphdef(template)
        others = nnx.state(template, nnx.Not(nnx.Param))
        if jax.tree.leaves(others):
            raise ConfigError(
                "Stack layers may hold only nnx.Param variables (the scan carries nothing "
                "but the activation); the layer built by make_layer also holds: "
                f"{sorted({type(v).__name__ for v in jax.tree.leaves(others, is_leaf=_is_var)})}"
                ". Remove RNG streams / mutable state from the layer."
            )

        def build(key: jax.Array):
            layer_graphdef, state = nnx.split(make_layer(nnx.Rngs(key)))
            if layer_graphdef != graphdef:
                raise ConfigError(
                    "Stack: make_layer built different module structures for different "
                    "keys; the structure (layer types, sizes, static settings) must not "
                    "depend on the random key"
                )
            return state

        keys = jax.random.split(rngs.params(), depth)
        stacked = jax.vmap(build)(keys)
        # One module holding every layer's parameters, each with a leading depth axis.
        self.layers = nnx.merge(graphdef, stacked)

    def _split(self):
        return nnx.split(self.layers)

    def layer(self, i: int) -> nnx.Module:
        """The ``i``-th layer as a standalone module (a copy of its parameters)."""
        graphdef, state = self._split()
        return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))

    def __call__(self, x: jax.Array) -> jax.Array:
        graphdef, state = self._split()

        def step(h, params):
            return nnx.merge(graphdef, params)(h), None

        return jax.lax.scan(step, x, state)[0]

    def inverse(self, y: jax.Array) -> jax.Array:
        graphdef, state = self._split()

        def step(h, params):
            return nnx.merge(graphdef, params).inverse(h), None

        return jax.lax.scan(step, y, state, reverse=True)[0]

    def forward_and_log_det(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        graphdef, state = self._split()

        # The carry stays the activation alone; each layer's log-det is a scanned output,
        # summed afterwards (a running-sum carry would start from a constant, which an
        # inverse-forward sweep cannot start from).
        def step(h, params):
            return nnx.merge(graphdef, params).forward_and_log_det(h)

        y, log_dets = jax.lax.scan(step, x, state)
        return y, jnp.sum(log_dets, axis=0)

    def log_det(self, x: jax.Array) -> jax.Array:
        return self.forward_and_log_det(x)[1]

    def initialize(self, x: jax.Array) -> jax.Array:
        """Initialise every layer in order on the batch ``x`` (see ``ActNorm``)."""
        graphdef, state = self._split()

        def step(h, params):
            layer = nnx.merge(graphdef, params)
            h = initialize(layer, h)
            return h, nnx.state(layer)

        y, new_state = jax.lax.scan(step, x, state)
        nnx.update(self.layers, new_state)
        return y


def _is_var(v) -> bool:
    return isinstance(v, nnx.Variable)
