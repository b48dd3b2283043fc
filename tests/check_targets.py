"""Targets for ``moonjax check`` in the tests: each returns ``(loss, args[, kwargs])``."""

import jax
import jax.numpy as jnp
from nets import LAYERS, PARAMS, classification_loss, data, scanned


def leaky_mlp():
    """A scanned leaky-ReLU MLP, as shapes: submersive."""
    params = jax.eval_shape(lambda: PARAMS["leaky"](jax.random.PRNGKey(0), 2, 4))
    x, y = jax.eval_shape(lambda: data(jax.random.PRNGKey(1), 3, 4))
    return classification_loss(scanned(LAYERS["leaky"])), (params, x, y)


def relu_loss(w, x, *, scale=1.0):
    h = jax.nn.relu(x @ w[0])  # marker: relu
    return scale * jnp.sum(jnp.tanh(h @ w[1]))


def relu_net():
    """A ReLU net, with a keyword argument: not submersive (fragments)."""
    return relu_loss, (jnp.stack([jnp.eye(4)] * 2), jnp.ones((3, 4))), {"scale": 2.0}


def abstract_relu_net():
    """The same, from shapes only."""
    w = jax.ShapeDtypeStruct((2, 4, 4), jnp.float32)
    x = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    return relu_loss, [w, x]


def residual_net():
    """``x + f(x)``: Moonwalk cannot sweep it."""

    def loss(w, x):
        return jnp.sum((x + jnp.tanh(x @ w)) @ w)

    return loss, (jnp.eye(4), jnp.ones((2, 4)))


def shape_bug():
    """A loss that fails in the user's own code."""
    return (lambda w, x: jnp.sum(x @ w)), (jnp.eye(3), jnp.ones((2, 4)))


def broken_contract():
    return lambda w, x: 0.0


def not_a_tuple_of_args():
    return relu_loss, jnp.ones(3)


NOT_CALLABLE = 3
