"""vijp, custom_vijp, register_vijp, errors, and the memory claim of mixed mode."""

import os

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from nets import LAYERS, PARAMS, classification_loss, data, rel_err, scanned

import moonjax

HERE = os.path.basename(__file__)


def test_vijp_inverts_vjp_on_a_coupling_block():
    p = jax.tree_util.tree_map(lambda a: a[0], PARAMS["affine"](jax.random.PRNGKey(0), 1, 6))
    x, _ = data(jax.random.PRNGKey(1), 4, 6)
    f = lambda x: LAYERS["affine"](x, p) @ (jnp.eye(6) * 2.0 + 0.1)
    out, vijp_fn = moonjax.vijp(f, x)
    g_out = jax.random.normal(jax.random.PRNGKey(2), out.shape, out.dtype)
    g_in = jax.vjp(f, x)[1](g_out)[0]
    assert jnp.allclose(out, f(x))
    assert rel_err(vijp_fn(g_in), g_out) <= 1e-10


def test_vijp_of_a_contracting_map_is_exact_on_the_row_space():
    w = jax.random.normal(jax.random.PRNGKey(3), (6, 3))
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 6))
    f = lambda x: jnp.tanh(x) @ w
    _, vijp_fn = moonjax.vijp(f, x)
    g_out = jax.random.normal(jax.random.PRNGKey(5), (5, 3))
    assert rel_err(vijp_fn(jax.vjp(f, x)[1](g_out)[0]), g_out) <= 1e-10


def test_custom_vijp_block_is_used_by_the_sweep():
    calls = []

    @moonjax.custom_vijp
    def scale(x, s):
        return x * jnp.exp(s) + jnp.sin(s)

    @scale.defvijp
    def _(x, s, g):
        calls.append(1)
        return g * jnp.exp(-s)

    def loss(s, x):
        for i in range(3):
            x = jnp.tanh(scale(x, s[i]))
        return jnp.sum(x ** 2)

    s = 0.1 * jnp.arange(12.0).reshape(3, 4)
    x = jnp.linspace(-1, 1, 8).reshape(2, 4)
    got = moonjax.moonwalk_grad(loss, mode="mixed")(s, x)
    assert calls, "the hand-written vijp was not used"
    assert rel_err(got, jax.grad(loss)(s, x)) <= 1e-10
    # jax.grad through the block is the ordinary one
    assert jnp.allclose(jax.grad(lambda s: jnp.sum(scale(x[0], s)))(s[0]),
                        x[0] * jnp.exp(s[0]) + jnp.cos(s[0]))


def test_register_vijp_adds_a_primitive_in_one_line():
    # cumsum: y_i = sum_{j<=i} x_j, so g_x = reverse cumsum of g_y and g_y_i = g_x_i - g_x_{i+1}
    def cumsum_vijp(g, x, *, argnum, axis, reverse):
        assert not reverse
        nxt = jnp.concatenate([lax.slice_in_dim(g, 1, None, axis=axis),
                               jnp.zeros_like(lax.slice_in_dim(g, 0, 1, axis=axis))], axis)
        return g - nxt

    def loss(w, x):
        return jnp.sum(jnp.tanh(jnp.cumsum(x @ w, axis=1) @ w) ** 2)

    w = jnp.eye(4) + 0.1
    x = jnp.linspace(-1, 1, 12).reshape(3, 4)
    with pytest.raises(moonjax.UnsupportedPrimitiveError, match="cumsum"):
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(w, x)
    moonjax.register_vijp(lax.cumsum_p, cumsum_vijp)
    try:
        assert rel_err(moonjax.moonwalk_grad(loss, mode="mixed")(w, x),
                       jax.grad(loss)(w, x)) <= 1e-10
    finally:
        from moonjax._src.rules import vijp_rules
        vijp_rules.pop(lax.cumsum_p)


# -- errors: what, where (the user's line), what to do ---------------------------------


def _line_of(fn, text):
    import inspect

    lines, start = inspect.getsourcelines(fn)
    for k, line in enumerate(lines):
        if text in line:
            return start + k
    raise AssertionError(text)


def test_unsupported_primitive_names_it_and_the_user_line():
    def loss(w, x):
        h = jnp.sort(x @ w, axis=-1) @ w  # sort: no vijp rule, and a layer follows
        return jnp.sum(h ** 2)

    with pytest.raises(moonjax.UnsupportedPrimitiveError) as e:
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(jnp.eye(3), jnp.ones((2, 3)))
    msg = str(e.value)
    assert "sort" in msg and f"{HERE}:{_line_of(loss, 'jnp.sort')}" in msg
    assert "custom_vijp" in msg


@pytest.mark.parametrize("act", ["relu", "where"])
def test_relu_on_the_spine_is_not_submersive_without_fragments(act):
    def loss(w, x):
        h = x @ w[0]
        h = jax.nn.relu(h) if act == "relu" else jnp.where(h > 0, h, 0.0)
        h = h @ w[1]
        return jnp.sum(h ** 2)

    with pytest.raises(moonjax.NotSubmersiveError) as e:
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(jnp.stack([jnp.eye(3)] * 2),
                                                     jnp.ones((2, 3)))
    assert HERE in str(e.value) and "submersive" in str(e.value)


def test_expanding_dense_layer_is_not_submersive_without_fragments():
    def loss(w, x):
        h = jnp.tanh(x @ w["up"])  # 3 -> 5 features
        return jnp.sum((h @ w["down"]) ** 2)

    w = {"up": jnp.ones((3, 5)), "down": jnp.ones((5, 2))}
    with pytest.raises(moonjax.NotSubmersiveError, match="maps 3 features to 5") as e:
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(w, jnp.ones((2, 3)))
    assert f"{HERE}:{_line_of(loss, 'x @ w')}" in str(e.value)


def test_residual_block_that_reads_its_input_twice_is_refused():
    def loss(w, x):
        h = x + jnp.tanh(x @ w)  # x feeds two layers: not invertible layer by layer
        return jnp.sum(h @ w)

    with pytest.raises(moonjax.SpineStructureError, match="feeds 2 operations"):
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(jnp.eye(3), jnp.ones((2, 3)))


def test_non_scalar_loss_raises_like_jax_grad():
    with pytest.raises(moonjax.LossShapeError, match="scalar"):
        moonjax.moonwalk_grad(lambda w, x: x @ w)(jnp.eye(2), jnp.ones((1, 2)))
    with pytest.raises(TypeError):  # LossShapeError is a TypeError, as in jax.grad
        moonjax.moonwalk_grad(lambda w, x: x @ w)(jnp.eye(2), jnp.ones((1, 2)))


def test_bad_arguments():
    loss = lambda w, x: jnp.sum(x @ w)
    with pytest.raises(moonjax.ArgumentError, match="argnums=2 is out of range"):
        moonjax.moonwalk_grad(loss, argnums=2)(jnp.eye(2), jnp.ones((1, 2)))
    with pytest.raises(moonjax.ArgumentError, match="float"):
        moonjax.moonwalk_grad(loss)(jnp.eye(2, dtype=jnp.int32), jnp.ones((1, 2)))
    with pytest.raises(moonjax.ArgumentError, match="network input"):  # for the sweep
        moonjax.moonwalk_grad(lambda w: jnp.sum(w ** 2), mode="mixed")(jnp.eye(2))
    with pytest.raises(moonjax.ArgumentError, match="mode"):
        moonjax.moonwalk_grad(loss, mode="sideways")


def test_debug_flags_a_singular_weight():
    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    w = jnp.array([[1.0, 2.0], [2.0, 4.0]])  # singular
    with pytest.raises(Exception, match="non-finite swept cotangent"):
        jax.block_until_ready(moonjax.moonwalk_grad(loss, mode="mixed", debug=True)(
            w, jnp.ones((3, 2))))


# -- memory: XLA's own accounting -----------------------------------------------------


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_mixed_mode_memory_of_a_deep_leaky_mlp_float32():
    """128 layers of 256x256, batch 128: at most half of jax.grad's temp memory, and
    at most half of its growth from 16 to 128 layers (phase 1 keeps sign masks only)."""
    loss = classification_loss(scanned(LAYERS["leaky"]))
    d, batch = 256, 128
    x = jnp.zeros((batch, d), jnp.float32)
    y = jnp.zeros((batch, d), jnp.float32)
    mem = {}
    for depth in (16, 128):
        params = {"w": jnp.zeros((depth, d, d), jnp.float32),
                  "b": jnp.zeros((depth, d), jnp.float32)}
        mem[depth] = (_temp_bytes(jax.grad(loss), params, x, y),
                      _temp_bytes(moonjax.moonwalk_grad(loss, mode="mixed", anchor_every=None),
                                  params, x, y))
    grad128, moon128 = mem[128]
    assert moon128 <= 0.5 * grad128
    assert (mem[128][1] - mem[16][1]) <= 0.5 * (mem[128][0] - mem[16][0])
