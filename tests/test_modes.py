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


@pytest.mark.parametrize("widths", [(4, 4, 4), (3, 7, 5, 2)])
def test_forward_records_fragments_by_jvps(widths):
    # the ReLU's (and the expanding layer's) output cotangent: one JVP per entry of
    # the fragment, as the input's; fragments=False keeps the error
    for seed in range(2):
        loss, params = _relu_mlp(widths, seed)
        x = jax.random.normal(jax.random.PRNGKey(10 + seed), (3, widths[0]))
        y = jax.random.normal(jax.random.PRNGKey(20 + seed), (3, widths[-1]))
        got = moonjax.moonwalk_grad(loss, mode="forward")(params, x, y)
        assert rel_err(got, jax.grad(loss)(params, x, y)) <= TOL
    with pytest.raises(moonjax.NotSubmersiveError):
        moonjax.moonwalk_grad(loss, mode="forward", fragments=False)(params, x, y)


def test_forward_records_fragments_inside_a_scan_with_aux():
    ws = jax.random.normal(jax.random.PRNGKey(4), (5, 4, 4)) / 2
    x, y = data(jax.random.PRNGKey(5), 3, 4)

    def loss(ws, x, y):
        h = jax.lax.scan(lambda h, w: (jax.nn.relu(h @ w), None), x, ws)[0]
        return jnp.mean((h - y) ** 2), jnp.max(h)

    (value, aux), got = moonjax.moonwalk_value_and_grad(loss, has_aux=True, mode="forward")(
        ws, x, y)
    (value_, aux_), want = jax.value_and_grad(loss, has_aux=True)(ws, x, y)
    assert rel_err(got, want) <= TOL
    assert np.allclose(value, value_) and np.allclose(aux, aux_)


def _scanned(body):
    return lambda ws, x: jnp.sum(jax.lax.scan(lambda h, w: (body(h, w), None), x, ws)[0])


def test_reversible_names_a_loop_body_without_inverse():
    loss = _scanned(lambda h, w: jnp.sort(h @ w, -1))
    ws = jnp.stack([jnp.eye(4)] * 3)
    with pytest.raises(moonjax.NotSubmersiveError, match="test_modes.py"):
        moonjax.moonwalk_grad(loss, mode="reversible", fragments=False)(ws, jnp.ones((2, 4)))


@pytest.mark.parametrize("body", [lambda h, w: jax.nn.relu(h @ w),
                                  lambda h, w: jnp.sort(h @ w, -1)], ids=["relu", "sort"])
def test_reversible_checkpoints_a_loop_without_inverse(body, x64):
    # relu forgets the negative entries (no inverse): with fragments (the default) the
    # loop is checkpointed reverse mode, exact; fragments=False refuses it
    loss = _scanned(body)
    for seed, depth in [(0, 3), (1, 7)]:
        ws = jax.random.normal(jax.random.key(seed), (depth, 4, 4), jnp.float64) / 2
        x = jax.random.normal(jax.random.key(seed + 1), (2, 4), jnp.float64)
        got = moonjax.moonwalk_grad(loss, mode="reversible")(ws, x)
        assert rel_err(got, jax.grad(loss)(ws, x)) <= 1e-12
    report = moonjax.check(loss, ws, x, mode="reversible")
    (scan,) = [g for g in report.groups if g.role == "scan"]
    assert scan.treatment.startswith("checkpointed reverse mode, the carry kept every 3"), scan
    with pytest.raises(moonjax.NotSubmersiveError, match="leave fragments=True"):
        moonjax.moonwalk_grad(loss, mode="reversible", fragments=False)(ws, x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reversible_inversion_that_loses_the_digits_is_refused(seed, x64):
    # leaky-ReLU 0.05 layers, 16 deep, unanchored: even float64 loses every digit
    # (measured drift 3e7 to 3e12); anchored every 2 steps it keeps them (drift 2e-13
    # to 1e-11, gradient error 5e-16 to 2e-15)
    loss = _scanned(lambda h, w: jax.nn.leaky_relu(h @ w, 0.05))
    ws = jax.random.normal(jax.random.key(seed), (16, 8, 8), jnp.float64) / np.sqrt(8)
    x = jax.random.normal(jax.random.key(seed + 1), (4, 8), jnp.float64)
    grad = moonjax.moonwalk_grad(loss, mode="reversible", anchor_every=None)
    with pytest.raises(moonjax.DriftError, match="rebuilt by inverting"):
        grad(ws, x)
    got = moonjax.moonwalk_grad(loss, mode="reversible", anchor_every=2)(ws, x)
    assert rel_err(got, jax.grad(loss)(ws, x)) <= 1e-12


def test_reversible_takes_unrolled_layers_by_reverse_mode(x64):
    # no loop to invert: reverse mode, exact (the memory of jax.grad)
    loss, params = _relu_mlp((4, 4, 4), 0)
    x = jax.random.normal(jax.random.key(1), (2, 4), jnp.float64)
    got = moonjax.moonwalk_grad(loss, mode="reversible")(params, x, x)
    assert rel_err(got, jax.grad(loss)(params, x, x)) <= 1e-12


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
    # unanchored (anchors store a carry every few steps of a dividing inverse)
    rev = _mem_by_depth(loss, make, (8, 64), lambda f: moonjax.moonwalk_grad(
        f, mode="reversible", anchor_every=None))
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
            grad = moonjax.moonwalk_grad(net(act), mode="mixed", anchor_every=None)
            mems[name, depth] = (_temp(grad, ws, x, x),
                                 _temp(jax.grad(net(act)), ws, x, x))
    relu_growth = mems["relu", 64][0] - mems["relu", 8][0]
    leaky_growth = mems["leaky", 64][0] - mems["leaky", 8][0]
    act_bytes = 56 * 32 * 32 * 4  # one float32 activation per extra layer
    assert 0.9 * act_bytes <= relu_growth <= 2.1 * act_bytes  # a fragment per ReLU layer
    assert leaky_growth <= 0.3 * act_bytes  # sign masks only
    assert leaky_growth <= 0.5 * (mems["leaky", 64][1] - mems["leaky", 8][1])


# -- forward mode with independent examples (batch_axis=0) -----------------------------


def _scan_lengths(jaxpr) -> list[int]:
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            out.append(eqn.params["length"])
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _scan_lengths(inner)
    return out


@pytest.mark.parametrize("kind", ["additive", "affine", "leaky", "tanh"])
def test_forward_batch_axis_matches_backprop_float64(kind):
    for seed, depth, batch in [(0, 3, 5), (1, 6, 16), (2, 2, 1)]:
        kp, kd = jax.random.split(jax.random.PRNGKey(seed))
        params = PARAMS[kind](kp, depth, 6)
        x, y = data(kd, batch, 6)
        loss = classification_loss(scanned(LAYERS[kind]))
        got = jax.jit(moonjax.moonwalk_grad(loss, (0, 1), mode="forward", batch_axis=0,
                                            stream_argnums=1))(params, x, y)
        assert rel_err(got, jax.grad(loss, (0, 1))(params, x, y)) <= TOL


def test_forward_batch_axis_takes_one_jvp_per_feature_not_per_entry():
    batch, width, depth = 16, 6, 5
    params = PARAMS["leaky"](jax.random.PRNGKey(0), depth, width)
    x, y = data(jax.random.PRNGKey(1), batch, width)
    loss = classification_loss(scanned(LAYERS["leaky"]))
    lengths = lambda **kw: _scan_lengths(jax.make_jaxpr(
        moonjax.moonwalk_grad(loss, mode="forward", **kw))(params, x, y).jaxpr)
    assert batch * width in lengths()  # one JVP per entry of the input
    batched = lengths(batch_axis=0)
    assert width in batched and batch * width not in batched
    assert 2 * 4 in batched  # the independence probes: 2 * ceil(log2(16))


def _mixing_loss(mix):
    loss = classification_loss(scanned(LAYERS["leaky"]))
    return lambda p, x, y: loss(p, mix(x), y)


@pytest.mark.parametrize("mix", [
    lambda x: jnp.roll(x, 1, axis=0),  # marker: mixes examples
    lambda x: jnp.eye(8)[jnp.array([0, 2, 1, 3, 4, 5, 6, 7])] @ x,  # marker: mixes examples
])
def test_forward_batch_axis_with_mixed_examples_is_nan_or_an_error(mix):
    params = PARAMS["leaky"](jax.random.PRNGKey(0), 3, 6)
    x, y = data(jax.random.PRNGKey(1), 8, 6)
    loss = _mixing_loss(mix)
    got = moonjax.moonwalk_grad(loss, mode="forward", batch_axis=0, on_drift="nan")(
        params, x, y)
    assert all(bool(jnp.all(jnp.isnan(g))) for g in jax.tree_util.tree_leaves(got))
    # by default the NaN input cotangent fails the drift check, which says why
    with pytest.raises(moonjax.DriftError, match="not independent"):
        moonjax.moonwalk_grad(loss, mode="forward", batch_axis=0)(params, x, y)
    # without the claim, forward mode is exact on the same loss
    exact = moonjax.moonwalk_grad(loss, mode="forward")(params, x, y)
    assert rel_err(exact, jax.grad(loss)(params, x, y)) <= TOL
    with pytest.raises(moonjax.ArgumentError, match="not independent") as e:
        moonjax.moonwalk_grad(loss, mode="forward", batch_axis=0, debug=True)(params, x, y)
    # it names where the batch meets (roll: its own slices; the matmul: the loss head)
    assert ".py:" in str(e.value) and "batch_axis" in str(e.value)


@pytest.mark.parametrize(("kw", "match"), [
    ({"batch_axis": 0}, "option of mode='forward'"),
    ({"batch_axis": 1, "mode": "forward"}, "batch_axis=1"),
    ({"batch_axis": True, "mode": "forward"}, "batch_axis=True"),
])
def test_bad_batch_axis_is_an_argument_error(kw, match):
    with pytest.raises(moonjax.ArgumentError, match=match):
        moonjax.moonwalk_grad(lambda w, x: jnp.sum(x @ w), **kw)


def test_batch_axis_needs_one_batch_size_across_inputs():
    def loss(w, x1, x2):
        return jnp.sum(jnp.tanh(x1 @ w)) + jnp.sum(jnp.tanh(x2 @ w))

    w, x1, x2 = jnp.eye(3), jnp.ones((4, 3)), jnp.ones((5, 3))
    with pytest.raises(moonjax.ArgumentError, match="same leading batch size"):
        moonjax.moonwalk_grad(loss, stream_argnums=(1, 2), mode="forward",
                              batch_axis=0)(w, x1, x2)
