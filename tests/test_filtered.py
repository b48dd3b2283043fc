"""``moonjax.filter_grad`` / ``filter_value_and_grad``: Equinox's filter semantics.

The inexact arrays of the first argument are differentiated; functions, integers and
flags held by the model stay as they are, under ``eqx.filter_jit`` too, and the
gradients equal ``equinox.filter_grad``'s in float64.
"""

import jax
import jax.numpy as jnp
import pytest
from nets import assert_grads_close

import moonjax

eqx = pytest.importorskip("equinox")


class Coupling(eqx.Module):
    mlp: eqx.nn.MLP  # holds its activation functions
    swap: bool = eqx.field(static=True)

    def __init__(self, key, width, swap):
        self.mlp = eqx.nn.MLP(width // 2, width // 2, 16, 2, activation=jax.nn.gelu,
                              key=key)
        self.swap = swap

    def __call__(self, h):
        u, v = jnp.split(h, 2, -1)
        out = jnp.concatenate([v + jax.vmap(self.mlp)(u), u], -1)
        return jnp.flip(out, -1) if self.swap else out


class Net(eqx.Module):
    blocks: list
    depth: int  # an int leaf: held fixed, not traced

    def __init__(self, key, width=6, depth=4):
        keys = jax.random.split(key, depth)
        self.blocks = [Coupling(k, width, i % 2 == 1) for i, k in enumerate(keys)]
        self.depth = depth

    def __call__(self, x):
        for block in self.blocks[:self.depth]:
            x = block(x)
        return x


def _f64(tree):
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, tree)


def _loss(model, x, y):
    return jnp.mean((model(x) - y) ** 2), model.depth


@pytest.mark.parametrize("seed", [0, 1])
def test_filter_value_and_grad_equals_equinox_in_float64(seed, x64):
    model = _f64(Net(jax.random.key(seed)))
    x = jax.random.normal(jax.random.key(10 + seed), (7, 6), jnp.float64)
    y = jax.random.normal(jax.random.key(20 + seed), (7, 6), jnp.float64)
    step = eqx.filter_jit(moonjax.filter_value_and_grad(_loss, has_aux=True))
    (value, aux), grads = step(model, x, y)
    (want_value, want_aux), want = eqx.filter_value_and_grad(_loss, has_aux=True)(
        model, x, y)
    assert aux == want_aux == 4 and abs(float(value) - float(want_value)) < 1e-12
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(want)
    assert_grads_close(grads, want, rtol=1e-9)


def test_filter_grad_takes_a_model_holding_functions(x64):
    model = _f64(Net(jax.random.key(3)))
    x = jax.random.normal(jax.random.key(4), (5, 6), jnp.float64)

    def loss(model, x):
        return jnp.sum(jnp.tanh(model(x)))

    grads = moonjax.filter_grad(loss)(model, x)
    assert_grads_close(grads, eqx.filter_grad(loss)(model, x), rtol=1e-9)
    assert grads.depth is None and grads.blocks[0].mlp.activation is None


def test_filter_grad_rejects_bad_options():
    with pytest.raises(moonjax.ArgumentError, match="mode"):
        moonjax.filter_grad(lambda m, x: jnp.sum(m * x), mode="backwards")
