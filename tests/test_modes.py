"""Every phase-1 mode, and fragmental checkpointing, against jax.grad (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nets import LAYERS, PARAMS, classification_loss, data, rel_err, scanned, unrolled

import moonjax

TOL = 1e-9
MODES = ["mixed", "reversible", "forward"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["additive", "affine", "leaky", "tanh"])
@pytest.mark.parametrize("style", ["scanned", "unrolled"])
def test_every_mode_matches_backprop_float64(mode, kind, style):
    for seed, depth in [(0, 3), (1, 6)]:
        kp, kd = jax.random.split(jax.random.PRNGKey(seed))
        params = PARAMS[kind](kp, depth, 6)
        x, y = data(kd, 3, 6)
        apply = (scanned if style == "scanned" else unrolled)(LAYERS[kind])
        loss = classification_loss(apply)
        got = moonjax.moonwalk_grad(loss, mode=mode)(params, x, y)
        assert rel_err(got, jax.grad(loss)(params, x, y)) <= TOL


def _relu_mlp(widths, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), len(widths))
    params = [jax.random.normal(k, (a, b)) / np.sqrt(a)
              for k, a, b in zip(keys, widths[:-1], widths[1:])]

    def loss(p, x, y):
        h = x
        for i, w in enumerate(p):
            h = h @ w
            if i < len(p) - 1:
                h = jax.nn.relu(h)
        return jnp.mean((h - y) ** 2)

    return loss, params


@pytest.mark.parametrize("widths", [(4, 8, 8, 3, 5), (6, 3, 9, 2), (5, 5, 5, 5)])
def test_fragments_make_relu_mlps_with_expanding_layers_exact(widths):
    for seed in range(3):
        loss, params = _relu_mlp(widths, seed)
        x = jax.random.normal(jax.random.PRNGKey(10 + seed), (7, widths[0]))
        y = jax.random.normal(jax.random.PRNGKey(20 + seed), (7, widths[-1]))
        got = moonjax.moonwalk_grad(loss)(params, x, y)
        assert rel_err(got, jax.grad(loss)(params, x, y)) <= TOL


def test_fragments_for_a_conv_net_with_max_pooling():
    k = jax.random.split(jax.random.PRNGKey(3), 4)
    params = {"k1": jax.random.normal(k[0], (3, 3, 1, 4)) / 3,
              "k2": jax.random.normal(k[1], (3, 3, 4, 4)) / 6,
              "w": jax.random.normal(k[2], (16 * 4, 5)) / 8}
    x = jax.random.normal(k[3], (4, 8, 8, 1))
    y = jax.nn.one_hot(jnp.arange(4) % 5, 5)
    conv = lambda h, w: jax.lax.conv_general_dilated(
        h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def loss(p, x, y):
        h = jax.nn.relu(conv(x, p["k1"]))
        h = jax.nn.leaky_relu(conv(h, p["k2"]), 0.1)
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(h.reshape(4, -1) @ p["w"]) * y, -1))

    assert rel_err(moonjax.moonwalk_grad(loss)(params, x, y),
                   jax.grad(loss)(params, x, y)) <= TOL


def test_fragments_inside_a_scan():
    ws = jax.random.normal(jax.random.PRNGKey(4), (6, 5, 5)) / np.sqrt(5)
    x, y = data(jax.random.PRNGKey(5), 4, 5)

    def loss(ws, x, y):
        h = jax.lax.scan(lambda h, w: (jnp.where(h @ w > 0, h @ w, 0.0), None), x, ws)[0]
        return jnp.mean(jnp.sort(h, -1) * y)

    assert rel_err(moonjax.moonwalk_grad(loss)(ws, x, y), jax.grad(loss)(ws, x, y)) <= TOL


def test_reversible_and_forward_do_not_take_fragments():
    loss, params = _relu_mlp((4, 4, 4), 0)
    x = jnp.ones((2, 4))
    for mode in ("reversible", "forward"):
        with pytest.raises(moonjax.NotSubmersiveError):
            moonjax.moonwalk_grad(loss, mode=mode)(params, x, x)


# -- memory vs depth, from XLA's own accounting (float32) ------------------------------


def _temp(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _mem_by_depth(loss, make_params, depths, method):
    x = jnp.zeros((32, 32), jnp.float32)
    return [_temp(method(loss), make_params(d), x, x) for d in depths]


@pytest.mark.parametrize("kind", ["additive", "leaky"])
def test_reversible_mode_memory_is_flat_in_depth(kind):
    loss = classification_loss(scanned(LAYERS[kind]))
    make = lambda d: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32),
                                            PARAMS[kind](jax.random.PRNGKey(0), d, 32))
    rev = _mem_by_depth(loss, make, (8, 64), lambda f: moonjax.moonwalk_grad(f, mode="reversible"))
    fwd = _mem_by_depth(loss, make, (8, 64), lambda f: moonjax.moonwalk_grad(f, mode="forward"))
    grad = _mem_by_depth(loss, make, (8, 64), jax.grad)
    assert rev[1] <= rev[0] * 1.05 + 4096 and fwd[1] <= fwd[0] * 1.05 + 4096
    assert grad[1] > 4 * grad[0] * 0.9  # backprop grows with depth


def test_fragment_memory_is_proportional_to_the_relu_layers():
    """A scanned net: with ReLU every layer stores a dense fragment (today about two
    activations' worth: the recorded cotangent and the zero it is read through), with
    leaky-ReLU none does (sign masks only)."""
    def net(act):
        def loss(ws, x, y):
            h = jax.lax.scan(lambda h, w: (act(h @ w), None), x, ws)[0]
            return jnp.mean((h - y) ** 2)
        return loss

    x = jnp.zeros((32, 32), jnp.float32)
    mems = {}
    for name, act in [("relu", jax.nn.relu), ("leaky", lambda h: jax.nn.leaky_relu(h, 0.2))]:
        for depth in (8, 64):
            ws = jnp.zeros((depth, 32, 32), jnp.float32)
            mems[name, depth] = (_temp(moonjax.moonwalk_grad(net(act)), ws, x, x),
                                 _temp(jax.grad(net(act)), ws, x, x))
    relu_growth = mems["relu", 64][0] - mems["relu", 8][0]
    leaky_growth = mems["leaky", 64][0] - mems["leaky", 8][0]
    act_bytes = 56 * 32 * 32 * 4  # one float32 activation per extra layer
    assert 0.9 * act_bytes <= relu_growth <= 2.1 * act_bytes  # a fragment per ReLU layer
    assert leaky_growth <= 0.3 * act_bytes  # sign masks only
    assert leaky_growth <= 0.5 * (mems["leaky", 64][1] - mems["leaky", 8][1])
