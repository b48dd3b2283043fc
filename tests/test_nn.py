"""Specification of `moonjax.nn`: invertible Flax NNX modules.

Every module is checked, at several shapes and seeds, for: exact inversion in float64,
log-dets that equal ``log|det|`` of the brute-force Jacobian, gradients (parameters and
input) under ``jax.jit(jax.grad)`` that match central finite differences, clear errors on
bad shapes, and a forward program that Moonwalk's sweep can handle (no gather, one
``dot_general`` per dense layer, a scan whose carry is the activation alone).
"""

from __future__ import annotations

import functools

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax.extend import core as jcore  # noqa: E402

import moonjax  # noqa: E402
from moonjax import nn  # noqa: E402

F64 = jnp.float64
SEEDS = (0, 1, 2)


# --------------------------------------------------------------------------- helpers


def rngs(seed: int) -> nnx.Rngs:
    """Random streams on an ``rbg`` key: its kernels compile far faster than threefry's on
    CPU, and module construction is eager, so this keeps the suite fast."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def randomize(state, seed, scale=0.2):
    """``state`` with every parameter moved by ``scale * N(0, 1)`` (off the identity init).

    Noise comes from NumPy, so no random-number kernel is compiled per shape.
    """
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape), a.dtype),
        state,
    )


def normal_like(tree, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), tree)


def tree_dot(a, b):
    return sum(jnp.vdot(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def tree_axpy(alpha, x, y):
    return jax.tree.map(lambda u, v: v + alpha * u, x, y)


def sub_jaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jcore.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jcore.Jaxpr):
                yield item


def all_primitives(jaxpr) -> set[str]:
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in sub_jaxprs(eqn):
            names |= all_primitives(sub)
    return names


def input_dependent_eqns(jaxpr, invar):
    """The top-level equations that read ``invar`` directly or through other equations."""
    tainted, found = {invar}, []
    for eqn in jaxpr.eqns:
        if any(isinstance(v, jcore.Var) and v in tainted for v in eqn.invars):
            found.append(eqn)
            tainted.update(eqn.outvars)
    return found


# Jitted with the graphdef static, so every seed of one case/shape shares a compilation.
@functools.partial(jax.jit, static_argnums=0)
def invert_both_ways(graphdef, params, x):
    """``(y, inverse(y), f(inverse(y)))`` with ``y = f(x)``."""
    model = nnx.merge(graphdef, params)
    y = model(x)
    x_back = model.inverse(y)
    return y, x_back, model(x_back)


@functools.partial(jax.jit, static_argnums=0)
def log_dets(graphdef, params, x):
    """The module's log-dets and, per example, ``slogdet`` of the brute-force Jacobian."""
    model = nnx.merge(graphdef, params)

    def one_example(v):
        return model(v.reshape((1, *x.shape[1:]))).reshape(-1)

    jacobians = jax.vmap(jax.jacfwd(one_example))(x.reshape(x.shape[0], -1))
    signs, brute_force = jnp.linalg.slogdet(jacobians)
    y, log_det = model.forward_and_log_det(x)
    return signs, brute_force, log_det, model.log_det(x), y, model(x)


def output_loss(graphdef, params, x, c):
    """A nonlinear scalar of the output and the log-det (exercises both)."""
    y, log_det = nnx.merge(graphdef, params).forward_and_log_det(x)
    return jnp.sum(jnp.tanh(y) * c) + 0.1 * jnp.sum(log_det)


@functools.partial(jax.jit, static_argnums=0)
def grads_and_finite_difference(graphdef, params, x, c, v_params, v_x, eps=1e-5):
    """``jax.grad`` of :func:`output_loss` and, along ``(v_params, v_x)``, the analytic and
    the central finite-difference directional derivatives."""
    g_params, g_x = jax.grad(output_loss, argnums=(1, 2))(graphdef, params, x, c)
    plus = output_loss(graphdef, tree_axpy(eps, v_params, params), x + eps * v_x, c)
    minus = output_loss(graphdef, tree_axpy(-eps, v_params, params), x - eps * v_x, c)
    analytic = tree_dot(g_params, v_params) + tree_dot(g_x, v_x)
    return (g_params, g_x), analytic, (plus - minus) / (2 * eps)


# --------------------------------------------------------------------------- the cases

# name -> (factory(rngs) -> module, input shapes). Shapes lead with the batch axis.
CASES = {
    "additive_coupling": (
        lambda r: nn.AdditiveCoupling(4, 8, rngs=r, param_dtype=F64),
        [(3, 4), (2, 3, 4)],
    ),
    "additive_coupling_tanh_side": (
        lambda r: nn.AdditiveCoupling(
            6, rngs=r, side=nn.MLP(3, 8, 3, rngs=r, activation=jnp.tanh, param_dtype=F64)
        ),
        [(5, 6)],
    ),
    "affine_coupling": (
        lambda r: nn.AffineCoupling(6, 8, rngs=r, param_dtype=F64),
        [(3, 6), (2, 2, 2, 6)],
    ),
    "affine_coupling_conv_side": (
        lambda r: nn.AffineCoupling(4, rngs=r, side=nn.ConvNet(2, 4, 4, rngs=r, param_dtype=F64)),
        [(2, 4, 4, 4)],
    ),
    "rev_block": (
        lambda r: nn.RevBlock(
            4, nn.MLP(2, 8, 2, rngs=r, param_dtype=F64), nn.MLP(2, 8, 2, rngs=r, param_dtype=F64)
        ),
        [(3, 4), (2, 5, 4)],
    ),
    "invertible_dense": (
        lambda r: nn.InvertibleDense(5, rngs=r, param_dtype=F64),
        [(4, 5), (2, 3, 5)],
    ),
    "invertible_dense_no_bias_custom_permutation": (
        lambda r: nn.InvertibleDense(
            4, rngs=r, use_bias=False, permutation=(1, 3, 0, 2), param_dtype=F64
        ),
        [(3, 4)],
    ),
    "conv1x1_lu": (
        lambda r: nn.InvertibleConv1x1(3, rngs=r, param_dtype=F64),
        [(2, 4, 4, 3), (1, 2, 6, 3)],
    ),
    "conv1x1_full_matrix": (
        lambda r: nn.InvertibleConv1x1(3, rngs=r, lu=False, param_dtype=F64),
        [(2, 4, 4, 3)],
    ),
    "actnorm": (lambda r: nn.ActNorm(3, param_dtype=F64), [(4, 3), (2, 3, 3, 3)]),
    "leaky_relu": (lambda r: nn.LeakyReLU(0.3), [(4, 6), (2, 3, 3, 2)]),
    "squeeze2": (lambda r: nn.Squeeze(2), [(2, 4, 6, 3), (1, 2, 2, 1)]),
    "squeeze3": (lambda r: nn.Squeeze(3), [(1, 6, 3, 2)]),
    "reverse": (lambda r: nn.Reverse(), [(3, 5), (2, 2, 2, 3)]),
    "channel_shuffle": (lambda r: nn.ChannelShuffle(3), [(2, 6), (2, 2, 2, 12)]),
    "sequential": (
        lambda r: nn.Sequential(
            nn.ActNorm(4, param_dtype=F64),
            nn.InvertibleDense(4, rngs=r, param_dtype=F64),
            nn.AffineCoupling(4, 8, rngs=r, param_dtype=F64),
            nn.LeakyReLU(0.5),
            nn.Reverse(),
            nn.ChannelShuffle(2),
        ),
        [(3, 4), (2, 2, 2, 4)],
    ),
    "stack": (
        lambda r: nn.Stack(
            lambda rr: nn.Sequential(
                nn.ActNorm(4, param_dtype=F64),
                nn.InvertibleConv1x1(4, rngs=rr, param_dtype=F64),
                nn.AffineCoupling(4, 8, rngs=rr, param_dtype=F64),
                nn.LeakyReLU(0.5),
            ),
            3,
            rngs=r,
        ),
        [(3, 4), (2, 2, 2, 4)],
    ),
}

SHAPE_CASES = [(name, shape) for name, (_, shapes) in CASES.items() for shape in shapes]


def build(name, seed):
    """The case's module, split, with its parameters moved off their initial values."""
    factory, _ = CASES[name]
    graphdef, params = nnx.split(factory(rngs(seed)))
    return graphdef, randomize(params, 100 + seed)


def data(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), F64)


# --------------------------------------------------------------------------- inversion


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(("name", "shape"), SHAPE_CASES)
def test_inverse_recovers_input_float64(name, shape, seed):
    graphdef, params = build(name, seed)
    x = data(shape, seed)
    y, x_back, y_again = invert_both_ways(graphdef, params, x)
    assert y.dtype == F64
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(x_back, x, rtol=0, atol=1e-10)
    np.testing.assert_allclose(y_again, y, rtol=0, atol=1e-10)


# --------------------------------------------------------------------------- log-dets


@pytest.mark.parametrize("name", list(CASES))
def test_log_det_matches_brute_force_jacobian(name):
    graphdef, params = build(name, 1)
    shape = CASES[name][1][0]
    signs, brute_force, log_det, log_det_alone, y, y_call = log_dets(
        graphdef, params, data(shape, 7)
    )
    assert np.all(signs != 0)
    assert log_det.shape == (shape[0],)
    np.testing.assert_allclose(log_det, brute_force, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(log_det_alone, log_det, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, y_call, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize("name", list(CASES))
def test_param_and_input_grads_match_finite_differences(name, seed):
    graphdef, params = build(name, seed)
    shape = CASES[name][1][-1]
    x = data(shape, seed + 10)
    c = data(jax.eval_shape(nnx.merge(graphdef, params), x).shape, seed + 20)
    v_params = normal_like(params, seed + 30)
    v_x = normal_like(x, seed + 40)
    grads, analytic, finite_difference = grads_and_finite_difference(
        graphdef, params, x, c, v_params, v_x
    )
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf))
    assert jax.tree.structure(grads[0]) == jax.tree.structure(params)
    np.testing.assert_allclose(analytic, finite_difference, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("seed", SEEDS[:2])
@pytest.mark.parametrize(("name", "shape"), SHAPE_CASES)
def test_moonwalk_param_and_input_grads_match_jax_grad(name, shape, seed):
    graphdef, params = build(name, seed)
    x = data(shape, 1 + 10 * seed)
    target = data(jax.eval_shape(nnx.merge(graphdef, params), x).shape, 2 + 10 * seed)

    def loss(params, x, y):
        model = nnx.merge(graphdef, params)
        return jnp.sum(jnp.tanh(model(x)) * y)

    got = jax.jit(moonjax.moonwalk_grad(loss, argnums=(0, 1), stream_argnums=1))(
        params, x, target)
    expected = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x, target)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make",
    [
        lambda: nn.AdditiveCoupling(5, 8, rngs=rngs(0)),
        lambda: nn.AffineCoupling(3, 8, rngs=rngs(0)),
        lambda: nn.RevBlock(7, lambda v: v, lambda v: v),
        lambda: nn.LeakyReLU(0.0),
        lambda: nn.LeakyReLU(-0.1),
        lambda: nn.LeakyReLU(float("nan")),
        lambda: nn.InvertibleDense(3, rngs=rngs(0), permutation=(0, 0, 1)),
        lambda: nn.InvertibleDense(0, rngs=rngs(0)),
        lambda: nn.Squeeze(0),
        lambda: nn.ChannelShuffle(0),
        lambda: nn.Stack(lambda r: nn.Reverse(), 0, rngs=rngs(0)),
    ],
    ids=[
        "additive_odd",
        "affine_odd",
        "revblock_odd",
        "slope_zero",
        "slope_negative",
        "slope_nan",
        "bad_permutation",
        "zero_width",
        "squeeze_zero",
        "shuffle_zero",
        "stack_depth_zero",
    ],
)
def test_bad_construction_raises_config_error(make):
    with pytest.raises(nn.ConfigError) as info:
        make()
    assert isinstance(info.value, moonjax.MoonjaxError)
    assert isinstance(info.value, ValueError)


def test_odd_features_message_says_what_to_do():
    with pytest.raises(nn.ConfigError, match="even"):
        nn.AdditiveCoupling(7, 8, rngs=rngs(0))
    with pytest.raises(nn.ConfigError, match="negative_slope > 0"):
        nn.LeakyReLU(0.0)


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: nn.AdditiveCoupling(4, 8, rngs=rngs(0)), (2, 6)),
        (lambda: nn.AffineCoupling(4, 8, rngs=rngs(0)), (2, 2)),
        (lambda: nn.InvertibleDense(4, rngs=rngs(0)), (2, 3)),
        (lambda: nn.InvertibleConv1x1(3, rngs=rngs(0)), (1, 2, 2, 4)),
        (lambda: nn.ActNorm(3), (2, 4)),
        (lambda: nn.Squeeze(2), (1, 3, 4, 1)),
        (lambda: nn.Squeeze(2), (1, 4, 5, 1)),
        (lambda: nn.Squeeze(2), (4, 4)),
        (lambda: nn.ChannelShuffle(4), (2, 6)),
    ],
    ids=[
        "additive_channels",
        "affine_channels",
        "dense_channels",
        "conv1x1_channels",
        "actnorm_channels",
        "squeeze_height",
        "squeeze_width",
        "squeeze_rank",
        "shuffle_groups",
    ],
)
def test_bad_input_shape_raises_shape_error(make, shape):
    layer = make()
    with pytest.raises(nn.ShapeError) as info:
        layer(jnp.ones(shape))
    assert isinstance(info.value, moonjax.MoonjaxError)
    assert isinstance(info.value, ValueError)
    assert str(shape) in str(info.value)


def test_bad_shape_is_reported_under_jit():
    graphdef, params = nnx.split(nn.AdditiveCoupling(4, 8, rngs=rngs(0)))
    with pytest.raises(nn.ShapeError, match="4 entries"):
        jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params, jnp.ones((2, 6)))


def test_inverse_checks_shapes_too():
    with pytest.raises(nn.ShapeError):
        nn.InvertibleDense(4, rngs=rngs(0)).inverse(jnp.ones((2, 5)))
    with pytest.raises(nn.ShapeError):
        nn.Squeeze(2).inverse(jnp.ones((1, 2, 2, 3)))


def test_stack_rejects_layers_with_rng_state():
    def make(r):
        return nn.Sequential(nn.AdditiveCoupling(4, 8, rngs=r), nnx.Dropout(0.1, rngs=r))

    with pytest.raises(nn.ConfigError, match="RngKey"):
        nn.Stack(make, 3, rngs=rngs(0))


# --------------------------------------------------------------------------- program structure


@pytest.mark.parametrize(("name", "shape"), SHAPE_CASES)
def test_forward_program_uses_no_gather(name, shape):
    graphdef, params = build(name, 0)
    jaxpr = jax.make_jaxpr(lambda p, x: nnx.merge(graphdef, p)(x))(params, data(shape, 0))
    banned = {"gather", "scatter", "scatter-add", "dynamic_slice", "dynamic_update_slice"}
    assert not all_primitives(jaxpr.jaxpr) & banned


@pytest.mark.parametrize("shape", [(3, 5), (2, 4, 4, 5)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_invertible_dense_forward_is_one_dot_general_of_input(shape, use_bias):
    layer = nn.InvertibleDense(5, rngs=rngs(0), use_bias=use_bias, param_dtype=F64)
    graphdef, params = nnx.split(layer)
    jaxpr = jax.make_jaxpr(lambda p, x: nnx.merge(graphdef, p)(x))(params, data(shape, 0)).jaxpr
    spine = input_dependent_eqns(jaxpr, jaxpr.invars[-1])
    names = [eqn.primitive.name for eqn in spine]
    assert names == (["dot_general", "add"] if use_bias else ["dot_general"])
    assert spine[0].invars[0] is jaxpr.invars[-1]  # x itself is the dot_general's lhs


def test_conv1x1_forward_is_one_dot_general_of_input():
    graphdef, params = nnx.split(nn.InvertibleConv1x1(3, rngs=rngs(0), lu=False))
    x = jnp.ones((2, 4, 4, 3))
    jaxpr = jax.make_jaxpr(lambda p, x: nnx.merge(graphdef, p)(x))(params, x).jaxpr
    assert [e.primitive.name for e in input_dependent_eqns(jaxpr, jaxpr.invars[-1])] == [
        "dot_general"
    ]


def test_invertible_dense_weight_is_p_l_u():
    layer = nn.InvertibleDense(4, rngs=rngs(0), param_dtype=F64)
    layer.log_s[...] = jnp.array([0.1, -0.2, 0.3, 0.0])
    w = layer.weight
    x = data((2, 4), 0)
    np.testing.assert_allclose(layer(x), x @ w + layer.bias[...], atol=1e-12)
    np.testing.assert_allclose(jnp.linalg.slogdet(w)[1], 0.2, atol=1e-12)
    np.testing.assert_allclose(layer.log_det(x), [0.2, 0.2], atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("make", [nn.InvertibleDense, nn.InvertibleConv1x1])
def test_lu_params_keep_param_dtype_with_x64_enabled(make, dtype):
    # x64 is on in this file: the initialiser's scale must not promote them to float64
    layer = make(4, rngs=rngs(0), param_dtype=dtype)
    leaves = jax.tree.leaves(nnx.state(layer, nnx.Param))
    assert leaves and {leaf.dtype for leaf in leaves} == {jnp.dtype(dtype)}


def count_eqns(jaxpr) -> int:
    return sum(1 + sum(count_eqns(s) for s in sub_jaxprs(e)) for e in jaxpr.eqns)


def test_stack_program_size_does_not_grow_with_depth():
    def block(r):
        return nn.Sequential(nn.AdditiveCoupling(4, 8, rngs=r), nn.InvertibleDense(4, rngs=r))

    sizes = []
    for depth in (2, 1000):
        # Abstract construction (shapes only): tracing needs no parameter values.
        stack = nnx.eval_shape(lambda: nn.Stack(block, depth, rngs=rngs(0)))  # noqa: B023
        graphdef, params = nnx.split(stack)
        for leaf in jax.tree.leaves(params):
            assert leaf.shape[0] == depth
        jaxpr = jax.make_jaxpr(lambda p, x, g=graphdef: nnx.merge(g, p)(x))(
            params, jnp.ones((2, 4))
        )
        scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
        assert len(scans) == 1
        # The carry is the activation alone; the per-layer parameters are the scanned xs.
        assert scans[0].params["num_carry"] == 1
        assert scans[0].params["length"] == depth
        sizes.append(count_eqns(jaxpr.jaxpr))
    assert sizes[0] == sizes[1]


def test_stack_equals_its_layers_applied_in_order():
    graphdef, params = build("stack", 0)
    stack = nnx.merge(graphdef, params)
    x = data((3, 4), 1)
    h = x
    for i in range(stack.depth):
        h = stack.layer(i)(h)
    np.testing.assert_allclose(stack(x), h, rtol=1e-12, atol=1e-12)


def test_stack_layers_get_different_parameters():
    stack = nn.Stack(lambda r: nn.InvertibleDense(4, rngs=r), 3, rngs=rngs(0))
    lower = np.asarray(stack.layers.lower[...])
    assert not np.allclose(lower[0], lower[1])


# --------------------------------------------------------------------------- ActNorm


@pytest.mark.parametrize("shape", [(64, 3), (8, 4, 4, 3)])
def test_actnorm_initialize_standardises_channels(shape):
    norm = nn.ActNorm(3, param_dtype=F64)
    x = 3.0 + 2.5 * data(shape, 0)
    y = norm.initialize(x)
    axes = tuple(range(len(shape) - 1))
    np.testing.assert_allclose(y.mean(axes), 0.0, atol=1e-10)
    np.testing.assert_allclose(y.std(axes), 1.0, atol=1e-5)
    np.testing.assert_allclose(norm(x), y, atol=1e-12)  # state was written


def test_actnorm_call_does_not_change_state():
    norm = nn.ActNorm(3, param_dtype=F64)
    before = jax.tree.map(np.asarray, nnx.state(norm))
    norm(3.0 + data((16, 3), 0))
    after = jax.tree.map(np.asarray, nnx.state(norm))
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        np.testing.assert_array_equal(a, b)


def test_stack_initialize_runs_each_actnorm_on_its_own_input():
    def block(r):
        return nn.Sequential(
            nn.InvertibleDense(3, rngs=r, param_dtype=F64), nn.ActNorm(3, param_dtype=F64)
        )

    stack = nn.Stack(block, 3, rngs=rngs(0))
    x = 5.0 + 3.0 * data((128, 3), 0)
    y = stack.initialize(x)
    np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(y.std(0), 1.0, atol=1e-5)
    np.testing.assert_allclose(stack(x), y, atol=1e-10)
    scales = np.asarray(stack.layers.layers[1].log_scale[...])
    assert scales.shape == (3, 3) and not np.allclose(scales[0], scales[1])


# --------------------------------------------------------------------------- training


def test_stack_trains_with_optax_adam():
    def block(r):
        return nn.Sequential(
            nn.AffineCoupling(4, 16, rngs=r, param_dtype=F64),
            nn.InvertibleDense(4, rngs=r, param_dtype=F64),
        )

    graphdef, params = nnx.split(nn.Stack(block, 4, rngs=rngs(0)))
    x = data((32, 4), 0)
    target = jnp.sin(2.0 * x[:, ::-1])

    def loss(params, x, y):
        return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        value, grads = jax.value_and_grad(loss)(params, x, target)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for _ in range(15):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert losses[-1] < 0.8 * losses[0]
    # Still exactly invertible after training.
    model = nnx.merge(graphdef, params)
    np.testing.assert_allclose(model.inverse(model(x)), x, atol=1e-10)


def test_initialize_helper_falls_back_to_call():
    np.testing.assert_array_equal(nn.initialize(nn.Reverse(), jnp.arange(3.0)), [2.0, 1.0, 0.0])


# -- default initialisation: deep stacks start near the identity -----------------------


@pytest.mark.parametrize("kind", ["AffineCoupling", "AdditiveCoupling"])
def test_deep_coupling_stack_inverts_to_float32_rounding_at_default_init(kind, x32):
    layer = getattr(nn, kind)
    stack = nn.Stack(lambda r: layer(32, 64, rngs=r), 64, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (16, 32))
    assert float(jnp.max(jnp.abs(stack.inverse(stack(x)) - x))) <= 1e-4


def test_deep_affine_stack_gradient_at_default_init_is_as_accurate_as_jax_grads(x32):
    stack = nn.Stack(lambda r: nn.AffineCoupling(16, 32, rngs=r), 64, rngs=nnx.Rngs(2))
    graphdef, params = nnx.split(stack, nnx.Param)
    # train-like weights: the zero-initialised output layers moved away from zero
    params = jax.tree_util.tree_map(
        lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)

    def loss(params, x):
        return jnp.mean(jnp.sin(nnx.merge(graphdef, params)(x)) ** 2)

    x = jax.random.normal(jax.random.key(4), (32, 16))
    with jax.enable_x64(True):
        up = lambda t: jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), t)
        ref = jax.grad(loss)(up(params), up(x))
    flat = lambda t: np.concatenate([np.ravel(np.asarray(a, np.float64))
                                     for a in jax.tree_util.tree_leaves(t)])
    err = lambda g: np.linalg.norm(flat(g) - flat(ref)) / np.linalg.norm(flat(ref))
    got = jax.jit(moonjax.moonwalk_grad(loss))(params, x)
    assert err(got) <= 4 * err(jax.grad(loss)(params, x)) + 1e-7
