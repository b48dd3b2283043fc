"""moonwalk_grad equals jax.grad: the core transform in mixed mode (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nets import (
    LAYERS,
    PARAMS,
    classification_loss,
    data,
    rel_err,
    scanned,
    unrolled,
)

import moonjax

TOL = 1e-9


def _case(kind, depth, seed, d=8, batch=5, style="scanned"):
    key = jax.random.PRNGKey(seed)
    kp, kd = jax.random.split(key)
    params = PARAMS[kind](kp, depth, d)
    x, y = data(kd, batch, d)
    apply = (scanned if style == "scanned" else unrolled)(LAYERS[kind])
    return classification_loss(apply), params, x, y


@pytest.mark.parametrize("depth,style", [
    *[(d, s) for d in (1, 2, 7) for s in ("unrolled", "scanned")], (64, "scanned"),
    # 64 unrolled layers take the sweep ~45 s to trace: with the benchmarks
    pytest.param(64, "unrolled", marks=pytest.mark.slow)])
@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_coupling_sweep_matches_backprop_float64(kind, depth, style):
    # deep unrolled programs are slow to compile: one seed there, two elsewhere
    for seed in range(1 if depth > 8 and style == "unrolled" else 2):
        loss, params, x, y = _case(kind, depth, seed, style=style)
        expected = jax.grad(loss)(params, x, y)
        got = moonjax.moonwalk_grad(loss)(params, x, y)
        assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("style", ["unrolled", "scanned"])
@pytest.mark.parametrize("depth", [1, 3, 8])
@pytest.mark.parametrize("kind", ["leaky", "tanh"])
def test_mlp_sweep_matches_backprop_float64(kind, depth, style):
    for seed in range(3):
        loss, params, x, y = _case(kind, depth, seed, style=style)
        expected = jax.grad(loss)(params, x, y)
        got = moonjax.moonwalk_grad(loss)(params, x, y)
        assert rel_err(got, expected) <= TOL


@pytest.mark.parametrize("shape", [(1, 4), (3, 6), (16, 10)])
def test_shapes_under_jit(shape):
    batch, d = shape
    loss, params, x, y = _case("additive", 5, 0, d=d, batch=batch)
    got = jax.jit(moonjax.moonwalk_grad(loss))(params, x, y)
    assert rel_err(got, jax.grad(loss)(params, x, y)) <= TOL


def test_value_and_grad_argnums_tuple_and_pytrees():
    loss, params, x, y = _case("leaky", 3, 1)
    first = {"w": params["w"][:1], "b": params["b"][:1]}
    rest = {"w": params["w"][1:], "b": params["b"][1:]}
    apply = scanned(LAYERS["leaky"])

    def two_part_loss(p1, p2, x, y):
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(apply(p2, apply(p1, x))) * y, -1))

    val, (g1, g2) = moonjax.moonwalk_value_and_grad(two_part_loss, argnums=(0, 1))(
        first, rest, x, y)
    ev, (e1, e2) = jax.value_and_grad(two_part_loss, argnums=(0, 1))(first, rest, x, y)
    assert jnp.allclose(val, ev, rtol=1e-12)
    assert rel_err(g1, e1) <= TOL and rel_err(g2, e2) <= TOL
    # a negative argnum means the same as in jax.grad
    g_neg = moonjax.moonwalk_grad(two_part_loss, argnums=-3)(first, rest, x, y)
    assert rel_err(g_neg, e2) <= TOL


def test_has_aux_returns_aux_like_jax_grad():
    loss, params, x, y = _case("tanh", 4, 2)

    def with_aux(p, x, y):
        value = loss(p, x, y)
        return value, {"loss": value, "n": x.shape[0]}

    g, aux = moonjax.moonwalk_grad(with_aux, has_aux=True)(params, x, y)
    e, eaux = jax.grad(with_aux, has_aux=True)(params, x, y)
    assert rel_err(g, e) <= TOL
    assert aux["n"] == eaux["n"] and jnp.allclose(aux["loss"], eaux["loss"])
    (v, aux2), g2 = moonjax.moonwalk_value_and_grad(with_aux, has_aux=True)(params, x, y)
    assert jnp.allclose(v, eaux["loss"]) and rel_err(g2, e) <= TOL


def test_vmap_of_grad_gives_per_example_gradients():
    loss, params, x, y = _case("additive", 3, 3)
    per_example = lambda p, xi, yi: loss(p, xi[None], yi[None])
    got = jax.vmap(moonjax.moonwalk_grad(per_example), in_axes=(None, 0, 0))(params, x, y)
    want = jax.vmap(jax.grad(per_example), in_axes=(None, 0, 0))(params, x, y)
    assert rel_err(got, want) <= TOL


def test_input_gradient_through_stream_argnums():
    loss, params, x, y = _case("affine", 4, 4)
    gp, gx = moonjax.moonwalk_grad(loss, argnums=(0, 1), stream_argnums=1)(params, x, y)
    ep, ex = jax.grad(loss, argnums=(0, 1))(params, x, y)
    assert rel_err(gp, ep) <= TOL and rel_err(gx, ex) <= TOL


def test_contracting_classifier_head_and_nested_jit():
    key = jax.random.PRNGKey(7)
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"body": PARAMS["additive"](k1, 3, 8),
              "head": jax.random.normal(k2, (8, 3)) / np.sqrt(8)}
    x, _ = data(k3, 6, 8)
    y = jax.nn.one_hot(jnp.arange(6) % 3, 3)
    body = jax.jit(scanned(LAYERS["additive"]))  # a nested jit inside the loss

    def loss(p, x, y):
        logits = body(p["body"], x) @ p["head"]
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, -1))

    assert rel_err(moonjax.moonwalk_grad(loss)(params, x, y),
                   jax.grad(loss)(params, x, y)) <= TOL


def test_parameter_preprocessing_and_activations_zoo():
    """Weights computed from parameters (LU), and many monotone activations."""
    key = jax.random.PRNGKey(11)
    d = 6
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"l": 0.3 * jax.random.normal(k1, (d, d)), "u": 0.3 * jax.random.normal(k2, (d, d)),
              "s": 0.1 * jnp.arange(d, dtype=jnp.float64), "c": jnp.float64(0.7)}
    x, y = data(k3, 4, d)
    x = 0.3 * x  # keep sinh and the sigmoid away from saturation (φ' = 0 in float64)

    def loss(p, x, y):
        w = (jnp.tril(p["l"], -1) + jnp.eye(d)) @ (jnp.triu(p["u"], 1) + jnp.diag(jnp.exp(p["s"])))
        h = x @ w
        h = jnp.sinh(h) * 0.5 + jnp.arcsinh(h) * p["c"]  # x + tanh-like elementwise region
        h = jax.nn.sigmoid(h) * 2.0 - 1.0
        h = jnp.exp(h) - p["c"]
        h = jnp.log(h + 2.0)
        h = h ** 3 + h
        h = h / p["c"] - 1.0
        h = jnp.maximum(h, 0.1 * h)  # leaky-ReLU written with max
        h = -h
        h = h.reshape(4, 2, 3).transpose(0, 2, 1).reshape(4, d)
        return jnp.sum((h - y) ** 2)

    assert rel_err(moonjax.moonwalk_grad(loss)(params, x, y),
                   jax.grad(loss)(params, x, y)) <= TOL


def test_slices_that_partition_a_value():
    loss_p = PARAMS["additive"](jax.random.PRNGKey(0), 2, 8)
    x, y = data(jax.random.PRNGKey(1), 3, 8)

    def loss(p, x, y):
        for i in range(2):
            x1, x2 = x[:, :4], x[:, 4:]
            t = jnp.tanh(x1 @ p["w1"][i] + p["b1"][i]) @ p["w2"][i]
            x = jnp.concatenate([x2 + t, x1], axis=1)
        return jnp.sum(x * y)

    assert rel_err(moonjax.moonwalk_grad(loss)(loss_p, x, y),
                   jax.grad(loss)(loss_p, x, y)) <= TOL


def test_float32_under_jit_is_close_to_float64_reference():
    loss, params, x, y = _case("additive", 16, 0)
    ref = jax.grad(loss)(params, x, y)
    p32, x32, y32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), (params, x, y))
    got = jax.jit(moonjax.moonwalk_grad(loss))(p32, x32, y32)
    assert jax.tree_util.tree_leaves(got)[0].dtype == jnp.float32
    base = rel_err(jax.grad(loss)(p32, x32, y32), ref)
    assert rel_err(got, ref) <= 10 * base + 1e-6
