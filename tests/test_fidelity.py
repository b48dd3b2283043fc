"""Float32 fidelity against a float64 jax.grad reference, with and without anchors."""

import os

import jax
import jax.numpy as jnp
import pytest
from nets import LAYERS, PARAMS, classification_loss, data, leaky_layer, rel_err, scanned

import moonjax


def _errors(kind, depth, methods, slope=0.1, d=32, batch=16, seed=0):
    """Relative errors against float64 ``jax.grad``; ``None`` where the call refused
    (``moonjax.DriftError``)."""
    kp, kd = jax.random.split(jax.random.PRNGKey(seed))
    layer = (lambda h, p: leaky_layer(h, p, slope)) if kind == "leaky" else LAYERS[kind]
    loss = classification_loss(scanned(layer))
    params, x, y = PARAMS[kind](kp, depth, d), *data(kd, batch, d)
    ref = jax.jit(jax.grad(loss))(params, x, y)
    p32, x32, y32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), (params, x, y))
    out = {"jax.grad": rel_err(jax.jit(jax.grad(loss))(p32, x32, y32), ref)}
    for name, kwargs in methods.items():
        try:
            out[name] = rel_err(moonjax.moonwalk_grad(loss, **kwargs)(p32, x32, y32), ref)
        except moonjax.DriftError:
            out[name] = None
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_the_default_keeps_a_deep_leaky_mlp_within_10x_of_float32_backprop(seed):
    """Slope 0.1, depth 256: the default anchors often enough (or refuses); without
    anchors the sweep is refused, never returned."""
    err = _errors("leaky", 256, {"default": {}, "none": {"mode": "mixed", "anchor_every": None}},
                  seed=seed)
    assert err["default"] is None or err["default"] <= 10 * err["jax.grad"]
    assert err["none"] is None  # why anchors exist: the drift check refuses the sweep


def test_additive_revnet_needs_no_anchor_for_moderate_depth():
    err = _errors("additive", 64, {"none": {"anchor_every": None}})
    assert err["none"] is not None and err["none"] <= 3 * err["jax.grad"]


@pytest.mark.parametrize("anchor", [1, 3, "auto"])
def test_anchored_sweep_is_exact_in_float64(anchor):
    for kind in ("leaky", "affine"):
        kp, kd = jax.random.split(jax.random.PRNGKey(1))
        params = PARAMS[kind](kp, 6, 6)
        x, y = data(kd, 3, 6)
        loss = classification_loss(scanned(LAYERS[kind]))
        got = moonjax.moonwalk_grad(loss, mode="mixed", anchor_every=anchor)(params, x, y)
        assert rel_err(got, jax.grad(loss)(params, x, y)) <= 1e-9


def test_anchor_memory_is_depth_over_k():
    loss = classification_loss(scanned(LAYERS["leaky"]))
    x = jnp.zeros((32, 32), jnp.float32)

    def temp(depth, k):
        params = {"w": jnp.zeros((depth, 32, 32), jnp.float32),
                  "b": jnp.zeros((depth, 32), jnp.float32)}
        fn = jax.jit(moonjax.moonwalk_grad(loss, mode="mixed", anchor_every=k))
        return fn.lower(params, x, x).compile().memory_analysis().temp_size_in_bytes

    carry = 32 * 32 * 4
    growth = temp(128, 4) - temp(16, 4)
    assert growth <= (112 / 4) * carry * 2.5 + 112 * 32 * 32  # anchors (+ sign masks)


def test_bad_anchor_argument():
    with pytest.raises(moonjax.ArgumentError, match="anchor_every"):
        moonjax.moonwalk_grad(lambda w, x: jnp.sum(x @ w), anchor_every=0)


@pytest.mark.skipif(not os.environ.get("MOONJAX_REPORT"),
                    reason="prints the errors of every mode (about 80 s): MOONJAX_REPORT=1")
def test_print_fidelity_table():
    """The errors of mixed mode, anchored, auto and reversible mode over depths and
    kinds of layer, printed for the docs (run with ``-s``); a report, not a check."""
    methods = {"mixed": {}, "anchor4": {"anchor_every": 4}, "auto": {"anchor_every": "auto"},
               "reversible": {"mode": "reversible"}}
    for kind in ("leaky", "tanh", "additive", "affine"):
        for depth in (16, 64, 256):
            err = _errors(kind, depth, methods)
            print(kind, depth, " ".join(f"{k}={v:.1e}" if v is not None else f"{k}=refused"
                                        for k, v in err.items()))


# -- moonjax.fidelity --------------------------------------------------------------------


def _f32_case(kind, depth, slope=0.1, d=16, batch=8):
    kp, kd = jax.random.split(jax.random.PRNGKey(2))
    layer = (lambda h, p: leaky_layer(h, p, slope)) if kind == "leaky" else LAYERS[kind]
    loss = classification_loss(scanned(layer))
    args = (PARAMS[kind](kp, depth, d), *data(kd, batch, d))
    return loss, jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), args)


def test_fidelity_flags_an_ill_conditioned_sweep_layer_by_layer():
    loss, args = _f32_case("leaky", 16)
    report = moonjax.fidelity(loss, *args, mode="mixed", anchor_every=None)
    assert report.reference == "float64" and not report.ok()
    assert report.drift > report.drift_tol and "BEYOND the tolerance" in str(report)
    assert report.backprop_error < 1e-5 and report.error > 1e3 * report.backprop_error
    per_layer = report.layers["['w']"]
    assert per_layer.shape == (16,) and per_layer[-1] > 1e3 * per_layer[0]  # grows with depth
    assert "ill-conditioned" in str(report) and "anchor_every" in str(report)


def test_fidelity_passes_once_anchored_and_matches_the_gradients_it_compares():
    loss, args = _f32_case("leaky", 16)
    report = moonjax.fidelity(loss, *args, anchor_every="auto")
    assert report.ok() and report.ratio <= 3 and "ill-conditioned" not in str(report)
    exact = jax.grad(loss)(*jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), args))
    got = moonjax.moonwalk_grad(loss, anchor_every="auto")(*args)
    # the report's gradient is computed eagerly, this one compiled: rounding differs
    assert report.error == pytest.approx(rel_err(got, exact), rel=0.05)


def test_fidelity_of_float64_inputs_is_against_backprop():
    loss, args = _f32_case("additive", 4)
    args = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), args)
    report = moonjax.fidelity(loss, *args)
    assert report.reference == "backprop" and report.backprop_error is None
    assert report.error < 1e-12 and report.ok()
    assert set(report.leaves) == {"['b1']", "['w1']", "['w2']"}


def test_fidelity_passes_bad_options_to_moonwalk_grad_errors():
    loss, args = _f32_case("additive", 2)
    with pytest.raises(moonjax.ArgumentError, match="mode"):
        moonjax.fidelity(loss, *args, mode="backwards")


def _coupling(h, p):
    x1, x2 = jnp.split(h, 2, -1)
    return jnp.concatenate([x2 + jnp.tanh(x1 @ p["w1"]) @ p["w2"], x1], -1)


def _scanned(params, x):
    return jnp.mean(jnp.sin(jax.lax.scan(lambda h, p: (_coupling(h, p), None), x,
                                         params)[0]) ** 2)


def _unrolled(params, x):
    h = x
    for i in range(params["w1"].shape[0]):
        h = _coupling(h, {k: v[i] for k, v in params.items()})
    return jnp.mean(jnp.sin(h) ** 2)


@pytest.mark.parametrize("loss", [_scanned, _unrolled], ids=["scanned", "unrolled"])
def test_fidelity_counts_the_blocks_the_default_recomputes(loss):
    # float32 couplings whose side branch dwarfs what it is added to (x10): inverting
    # them loses bits, so the default recomputes the drifting blocks exactly (the
    # gradient keeps jax.grad's error) and fidelity says how many; at x1 none drift
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k3, (16, 16), jnp.float32)
    for scale, drifting in ((1.0, False), (10.0, True)):
        params = {"w1": jax.random.normal(k1, (32, 8, 16), jnp.float32) / 3,
                  "w2": scale * jax.random.normal(k2, (32, 16, 8), jnp.float32) / 4}
        report = moonjax.fidelity(loss, params, x)
        ((where_, (done, seen)),) = report.recomputed.items()
        assert seen >= 2 and (done >= 1) == drifting, report.recomputed
        assert report.error <= 2 * report.backprop_error, str(report)
        assert "recomputed exactly" in str(report)
