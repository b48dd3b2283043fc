"""The static plan (``mode="auto"``) and reversible backprop derived from the program.

Every treatment and every combination the plan can make, in float64 against
``jax.grad`` (rtol 1e-9), and the plan chosen for each benchmark model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nets import (
    PARAMS,
    additive_layer,
    assert_grads_close,
    classification_loss,
    data,
    leaky_layer,
    scanned,
    tanh_layer,
)

import moonjax
from moonjax.bench._models import MODELS, init_params, make_data, make_loss

RTOL = 1e-9
D, BATCH, DEPTH = 8, 6, 4
SEEDS = (0, 1)


def _coupling_then_leaky(h, p):
    return leaky_layer(additive_layer(h, p), p, slope=0.5)


def _residual(h, p):
    return h + 0.1 * jnp.tanh(h @ p["w"])


def _both_params(key, depth, d):
    k1, k2 = jax.random.split(key)
    return PARAMS["additive"](k1, depth, d) | PARAMS["leaky"](k2, depth, d)


def _next_to_unrolled(params, x):
    """Unrolled leaky layers, a scan of couplings, an unrolled tanh layer."""
    layer = lambda i: jax.tree_util.tree_map(lambda a: a[i], params["dense"])
    h = leaky_layer(leaky_layer(x, layer(0), slope=0.5), layer(1), slope=0.5)
    h = scanned(additive_layer)(params["couplings"], h)
    return tanh_layer(h, layer(2))


def _two_loops(params, x):
    h = scanned(additive_layer)(params["couplings"], x)
    return scanned(lambda h, p: leaky_layer(h, p, slope=0.5))(params["dense"], h)


def _split_params(key, depth, d):
    k1, k2 = jax.random.split(key)
    return {"couplings": PARAMS["additive"](k1, depth, d),
            "dense": PARAMS["leaky"](k2, max(depth, 3), d)}


# name -> (apply, init, the plan's treatment under mode="auto")
PROGRAMS = {
    "couplings": (scanned(additive_layer), PARAMS["additive"], "reversible"),
    "coupling+leaky body": (scanned(_coupling_then_leaky), _both_params, "checkpointed"),
    "residual body": (scanned(_residual), PARAMS["leaky"], "checkpointed"),
    "scan next to unrolled layers": (_next_to_unrolled, _split_params, "mixed"),
    "two loops": (_two_loops, _split_params, "checkpointed"),  # its leaky loop
}
# forced treatments that apply (reversible needs a body with an inverse)
FORCED = {
    "couplings": ("mixed", "reversible"),
    "coupling+leaky body": ("mixed", "reversible"),
    "residual body": ("mixed",),
    "scan next to unrolled layers": ("mixed", "reversible"),
    "two loops": ("mixed", "reversible"),
}


def _case(name, seed):
    apply, init, _ = PROGRAMS[name]
    kp, kd = jax.random.split(jax.random.key(seed))
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), init(kp, DEPTH, D))
    x, y = data(kd, BATCH, D)
    return classification_loss(apply), params, x, y


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_default_is_exact_on_every_combination(name, seed, x64):
    loss, params, x, y = _case(name, seed)
    got = jax.jit(moonjax.moonwalk_grad(loss))(params, x, y)
    assert_grads_close(got, jax.grad(loss)(params, x, y), RTOL)


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_the_plan_of_each_combination(name, x64):
    loss, params, x, y = _case(name, 0)
    want = PROGRAMS[name][2]
    report = moonjax.check(loss, params, x, y)
    assert report.ok
    assert report.treatment == want, report.plan


@pytest.mark.parametrize("name,mode", [(n, m) for n in PROGRAMS for m in FORCED[n]])
def test_forced_treatments_are_exact(name, mode, x64):
    loss, params, x, y = _case(name, 1)
    got = moonjax.moonwalk_grad(loss, mode=mode)(params, x, y)
    assert_grads_close(got, jax.grad(loss)(params, x, y), RTOL)


def test_scan_next_to_unrolled_layers_weighs_the_reverse_mode_outside():
    # the unrolled layers before the loop would keep more than 4 carries of
    # activations in reverse mode: the plan sweeps instead, and says why
    loss, params, x, y = _case("scan next to unrolled layers", 0)
    report = moonjax.check(loss, params, x, y)
    assert report.treatment == "mixed" and "outside the loops" in report.plan


def test_reversible_backprop_with_aux_argnums_and_the_input_gradient(x64):
    loss, params, x, y = _case("couplings", 0)

    def with_aux(params, x, y):
        value = loss(params, x, y)
        return value, {"twice": 2 * value}

    vg = moonjax.moonwalk_value_and_grad(with_aux, argnums=(0, 1), has_aux=True)
    (value, aux), (g_params, g_x) = vg(params, x, y)
    (want_value, want_aux), (w_params, w_x) = jax.value_and_grad(
        with_aux, argnums=(0, 1), has_aux=True)(params, x, y)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(aux["twice"], want_aux["twice"], rtol=1e-12)
    assert_grads_close(g_params, w_params, RTOL)
    assert_grads_close(g_x, w_x, RTOL)


def test_reversible_backprop_under_vmap(x64):
    loss, params, x, y = _case("couplings", 0)
    xs = jnp.stack([x, 2 * x, -x])
    ys = jnp.stack([y] * 3)
    got = jax.jit(jax.vmap(moonjax.moonwalk_grad(loss), in_axes=(None, 0, 0)))(params, xs, ys)
    want = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, xs, ys)
    assert_grads_close(got, want, RTOL)


def test_reversible_backprop_keeps_a_carry_every_16_layers():
    # float32 temp memory: the hand-written custom_vjp's plus the carries stored every 16
    # layers and one block's 16 step inputs (what the default's exact recompute of a
    # drifting loop holds), and one activation's worth of slack
    model = MODELS["revnet_mlp"]
    temps = {}
    for depth in (8, 64):
        p = init_params(model, 0, depth, model.width)
        x, y = make_data(model, 0, model.batch, model.width)
        for name, fn in (("moonwalk", moonjax.moonwalk_grad(make_loss(model))),
                         ("revbackprop", jax.grad(make_loss(model, "reversible"))),
                         ("jax.grad", jax.grad(make_loss(model)))):
            compiled = jax.jit(fn).lower(p, x, y).compile()
            temps[name, depth] = compiled.memory_analysis().temp_size_in_bytes
    activation = model.batch * model.width * 4
    for depth in (8, 64):
        stored, block = (depth - 1) // 16, min(depth, 16)
        assert temps["moonwalk", depth] <= (temps["revbackprop", depth]
                                            + (stored + block + 1) * activation)
    assert temps["moonwalk", 64] <= 0.25 * temps["jax.grad", 64]


@pytest.mark.parametrize("name,want", [("revnet_mlp", "reversible"),
                                       ("conv_revnet", "reversible"),
                                       ("rev_transformer", "reversible"),
                                       ("leaky_mlp", "checkpointed")])
def test_the_plan_of_each_bench_model(name, want):
    model = MODELS[name]
    p = init_params(model, 0, 256, model.width)  # the headline depth (tracing only)
    x, y = make_data(model, 0, model.batch, model.width)
    report = moonjax.check(make_loss(model), p, x, y)
    assert report.ok and report.treatment == want, report.plan
    (loop,) = [g for g in report.groups if g.role == "scan"]
    if want == "reversible":
        assert loop.treatment.startswith("reversible backprop")
        assert "adds and moves" in loop.treatment
    else:  # the leaky layer's inverse divides by its slope and solves with its weight
        assert loop.treatment.startswith("checkpointed reverse mode"), loop.treatment
        assert "Newton" in loop.treatment or "solves" in loop.treatment
        assert "_leaky_layer" in loop.treatment


@pytest.mark.parametrize("name", ["scan next to unrolled layers"])
def test_a_swept_program_inverts_its_coupling_loop_in_phase_1(name):
    # float32 XLA temp: the couplings' phase 1 keeps one carry instead of their side
    # branches' activations (measured 5,704 bytes under the default and mode="mixed",
    # against 10,320 without the inversion and jax.grad's 12,464)
    loss, params, x, y = _case(name, 0)
    params, x, y = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), (params, x, y))
    temp = {mode: jax.jit(moonjax.moonwalk_grad(loss, mode=mode)).lower(params, x, y)
            .compile().memory_analysis().temp_size_in_bytes for mode in ("auto", "mixed")}
    temp["jax.grad"] = jax.jit(jax.grad(loss)).lower(params, x, y).compile(
        ).memory_analysis().temp_size_in_bytes
    assert max(temp["auto"], temp["mixed"]) < 0.5 * temp["jax.grad"], temp
    for mode in ("auto", "mixed"):
        couplings = [g for g in moonjax.check(loss, params, x, y, mode=mode).groups
                     if g.role == "scan"][0]
        assert couplings.treatment.startswith("phase 1 inverts it"), couplings


@pytest.mark.parametrize("depth,reverse", [(64, False), (64, True), (7, True)])
def test_leaky_loops_of_any_length_are_checkpointed_and_exact(depth, reverse, x64):
    # blocks of round(sqrt(depth)) steps, the last one shorter where they do not divide
    want = "checkpointed"
    def apply(params, x):
        step = lambda h, p: (leaky_layer(h, p, slope=0.5), None)
        return jax.lax.scan(step, x, params, reverse=reverse)[0]

    loss = classification_loss(apply)
    for seed in SEEDS:
        kp, kd = jax.random.split(jax.random.key(seed))
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                        PARAMS["leaky"](kp, depth, D))
        x, y = data(kd, BATCH, D)
        assert moonjax.check(loss, params, x, y).treatment == want
        got = jax.jit(moonjax.moonwalk_grad(loss, argnums=(0, 1)))(params, x, y)
        assert_grads_close(got, jax.grad(loss, argnums=(0, 1))(params, x, y), RTOL)


def test_checkpointed_loop_memory_grows_as_the_square_root_of_depth():
    # float32 XLA temp of the leaky MLP bench model (width 64, batch 256), measured:
    # 1.25 / 2.25 MiB at depth 64 / 256 checkpointed, 0.90 MiB at depth 16 (swept: the
    # plan's estimate prefers the sweep there); jax.grad: 1.45 / 5.20 / 20.2 MiB,
    # the sweep anchored as "auto" says (every 4 / 8 / 16): 0.72 / 0.92 / 1.76 MiB,
    # sqrt(depth) carries as well
    model = MODELS["leaky_mlp"]
    x, y = make_data(model, 0, model.batch, model.width)
    temp = {}
    for depth in (16, 256):
        p = init_params(model, 0, depth, model.width)
        for name, fn in (("auto", moonjax.moonwalk_grad(make_loss(model))),
                         ("mixed", moonjax.moonwalk_grad(make_loss(model), mode="mixed")),
                         ("jax.grad", jax.grad(make_loss(model)))):
            compiled = jax.jit(fn).lower(p, x, y).compile()
            temp[name, depth] = compiled.memory_analysis().temp_size_in_bytes
    assert temp["auto", 256] < 4 * temp["auto", 16], temp  # 16x the depth
    assert temp["auto", 256] < 0.2 * temp["jax.grad", 256], temp
    assert temp["auto", 256] < 1.5 * temp["mixed", 256], temp


@pytest.mark.parametrize("length,k,reverse", [(12, 3, False), (12, 4, True), (3, 1, True),
                                              (2, 2, False)])
def test_checkpointed_scan_is_reverse_mode(length, k, reverse, x64):
    # any block length dividing the loop, either direction, a carry that is not the
    # stream, ys read by the loss: values and every gradient equal jax.grad's
    from moonjax._src import graph as G
    from moonjax._src.checkpointed import checkpointed_scan as _checkpointed_scan
    from moonjax._src.reverse import evaluate

    def f(ws, x, c0):
        def body(c, w):
            h, s = c
            h = jnp.tanh(h @ w) * s
            return (h, s + 1.0), jnp.sum(h)
        (h, s), ys = jax.lax.scan(body, (x, c0), ws, reverse=reverse)
        return jnp.sum(h) + jnp.sum(ys * jnp.arange(length)) + s

    ws = jax.random.normal(jax.random.key(0), (length, 4, 4))
    x, c0 = jax.random.normal(jax.random.key(1), (2, 4)), jnp.float64(0.5)
    graph, consts = G.flatten(jax.make_jaxpr(f)(ws, x, c0))
    (node,) = [n for n in graph.nodes if n.primitive is jax.lax.scan_p]
    bind = lambda n, a: _checkpointed_scan(n, k)(a) if n is node else None
    g = lambda *a: evaluate(graph, [*consts, *a], bind)[0]
    np.testing.assert_allclose(g(ws, x, c0), f(ws, x, c0), rtol=1e-13)
    assert_grads_close(jax.grad(g, (0, 1, 2))(ws, x, c0), jax.grad(f, (0, 1, 2))(ws, x, c0),
                       RTOL)


def test_checkpointed_loop_with_aux_argnums_and_vmap(x64):
    apply = lambda params, x: jax.lax.scan(
        lambda h, p: (leaky_layer(h, p, slope=0.5), None), x, params)[0]
    loss = classification_loss(apply)
    params = PARAMS["leaky"](jax.random.key(0), 64, D)
    x, y = data(jax.random.key(1), BATCH, D)
    assert moonjax.check(loss, params, x, y).treatment == "checkpointed"

    def with_aux(params, x, y):
        value = loss(params, x, y)
        return value, {"twice": 2 * value}

    (value, aux), grads = moonjax.moonwalk_value_and_grad(
        with_aux, argnums=(0, 1), has_aux=True)(params, x, y)
    (want_value, want_aux), want = jax.value_and_grad(
        with_aux, argnums=(0, 1), has_aux=True)(params, x, y)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(aux["twice"], want_aux["twice"], rtol=1e-12)
    assert_grads_close(grads, want, RTOL)
    xs, ys = jnp.stack([x, 2 * x, -x]), jnp.stack([y] * 3)
    got = jax.jit(jax.vmap(moonjax.moonwalk_grad(loss), in_axes=(None, 0, 0)))(params, xs, ys)
    assert_grads_close(got, jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(params, xs, ys),
                       RTOL)
