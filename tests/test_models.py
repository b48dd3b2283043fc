"""Specification of `moonjax.models`: reference networks built from `moonjax.nn`.

Each model is exactly invertible where it claims to be (float64, ≤1e-10), trains with
optax's adam under ``jax.grad`` (the loss goes down), has finite gradients that match
finite differences, raises clear errors on bad configurations, and gives the same
gradients under ``moonjax.moonwalk_grad`` as under ``jax.grad``.
"""

from __future__ import annotations

import functools
import math

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

import moonjax  # noqa: E402
from moonjax import models, nn  # noqa: E402

F64 = jnp.float64


# --------------------------------------------------------------------------- helpers


def rngs(seed: int) -> nnx.Rngs:
    """Random streams on an ``rbg`` key: its kernels compile far faster than threefry's on
    CPU, and module construction is eager, so this keeps the suite fast."""
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def grads_match(loss, params, x, y, *, rtol=1e-8, atol=1e-10):
    """Assert ``moonjax.moonwalk_grad(loss)`` equals ``jax.grad(loss)`` (both jitted).

    ``loss(params, x, y)``: ``params`` (argnums=0) is differentiated, ``x`` and ``y`` are
    the stream. Skips while the core transform is not available.
    """
    moonwalk = getattr(moonjax, "moonwalk_grad", None)
    if moonwalk is None:
        pytest.skip("moonjax.moonwalk_grad is not implemented yet")
    got = jax.jit(moonwalk(loss, argnums=0))(params, x, y)
    expected = jax.jit(jax.grad(loss))(params, x, y)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=rtol, atol=atol)


def data(shape, seed, scale=1.0, shift=0.0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(shift + scale * rng.standard_normal(shape), F64)


def labels(n, num_classes, seed):
    return jnp.asarray(np.random.default_rng(seed).integers(0, num_classes, n))


def train(loss, params, args, steps=8, learning_rate=1e-2, value_and_grad=jax.value_and_grad):
    """``steps`` jitted adam steps on ``loss(params, *args)``; returns params and losses."""
    optimizer = optax.adam(learning_rate)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state):
        value, grads = value_and_grad(loss)(params, *args)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    losses = []
    for _ in range(steps):
        params, opt_state, value = step(params, opt_state)
        losses.append(float(value))
    assert all(np.isfinite(losses))
    return params, losses


def directional_check(loss, params, args, seed, eps=1e-5):
    """``jax.grad`` along a random direction equals a central finite difference."""
    rng = np.random.default_rng(seed)
    direction = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), a.dtype), params)

    @jax.jit
    def both(params, direction):
        grads = jax.grad(loss)(params, *args)
        plus = loss(jax.tree.map(lambda p, v: p + eps * v, params, direction), *args)
        minus = loss(jax.tree.map(lambda p, v: p - eps * v, params, direction), *args)
        analytic = sum(
            jnp.vdot(g, v)
            for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
        )
        return grads, analytic, (plus - minus) / (2 * eps)

    grads, analytic, finite_difference = both(params, direction)
    for leaf in jax.tree.leaves(grads):
        assert np.all(np.isfinite(leaf))
    np.testing.assert_allclose(analytic, finite_difference, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- RevNetClassifier

REVNET_CONFIGS = {
    "flat": dict(input_shape=6, num_classes=3, depth=2, hidden=16),
    "flat_padded": dict(input_shape=5, num_classes=8, depth=2, hidden=16),
    "image": dict(input_shape=(4, 4, 1), num_classes=3, depth=2, hidden=4),
}


@functools.cache
def revnet(name, seed=0):
    """``(graphdef, params, input_shape)`` of a configuration, built once per session."""
    config = REVNET_CONFIGS[name]
    model = models.RevNetClassifier(
        config["input_shape"],
        config["num_classes"],
        depth=config["depth"],
        hidden=config["hidden"],
        rngs=rngs(seed),
        param_dtype=F64,
    )
    shape = config["input_shape"]
    return *nnx.split(model), ((shape,) if isinstance(shape, int) else tuple(shape))


@functools.partial(jax.jit, static_argnums=0)
def revnet_roundtrip(graphdef, params, x):
    model = nnx.merge(graphdef, params)
    h = model.features(x)
    return h, model.invert_features(h), model(x)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(REVNET_CONFIGS))
def test_revnet_features_invert_to_the_input_float64(name, seed):
    graphdef, params, shape = revnet(name, seed)
    model = nnx.merge(graphdef, params)
    x = data((4, *shape), seed)
    h, x_back, logits = revnet_roundtrip(graphdef, params, x)
    np.testing.assert_allclose(x_back, x, rtol=0, atol=1e-10)
    assert logits.shape == (4, REVNET_CONFIGS[name]["num_classes"])
    assert h.shape[-1] == model.width >= model.num_classes
    assert np.all(np.isfinite(logits))


def test_revnet_parameters_are_stacked_over_depth():
    model = nnx.merge(*revnet("flat")[:2])
    for leaf in jax.tree.leaves(nnx.state(model.body)):
        assert leaf.shape[0] == 2


@pytest.mark.parametrize("name", ["flat", "image"])
def test_revnet_trains_with_adam(name):
    graphdef, params, shape = revnet(name)
    num_classes = REVNET_CONFIGS[name]["num_classes"]
    x = data((24, *shape), 0)
    # Learnable labels: which third of the range the input's mean falls in.
    mean = x.reshape(24, -1).mean(-1)
    y = jnp.digitize(mean, jnp.quantile(mean, jnp.linspace(0, 1, num_classes + 1)[1:-1]))
    _, losses = train(models.classifier_loss(graphdef), params, (x, y), learning_rate=3e-2)
    assert losses[-1] < 0.8 * losses[0]


def test_revnet_gradients_match_finite_differences():
    graphdef, params, shape = revnet("flat_padded")
    x, y = data((6, *shape), 2), labels(6, 8, 3)
    directional_check(models.classifier_loss(graphdef), params, (x, y), seed=4)


@pytest.mark.parametrize("name", ["flat", "image"])
def test_revnet_moonwalk_grad_matches_jax_grad(name):
    graphdef, params, shape = revnet(name)
    num_classes = REVNET_CONFIGS[name]["num_classes"]
    x, y = data((4, *shape), 5), labels(4, num_classes, 6)
    grads_match(models.classifier_loss(graphdef), params, x, y)


def test_revnet_configuration_errors():
    r = rngs(0)
    with pytest.raises(nn.ConfigError, match="full-rank"):
        models.RevNetClassifier(4, 10, width=6, rngs=r)
    with pytest.raises(nn.ConfigError):
        models.RevNetClassifier(4, 3, width=5, rngs=r)  # odd width
    with pytest.raises(nn.ConfigError):
        models.RevNetClassifier(8, 3, width=6, rngs=r)  # narrower than the input
    with pytest.raises(nn.ShapeError):
        models.RevNetClassifier((5, 4, 1), 3, rngs=r)  # odd height
    with pytest.raises(nn.ConfigError):
        models.RevNetClassifier((4, 4), 3, rngs=r)
    model = nnx.eval_shape(lambda: models.RevNetClassifier(4, 3, rngs=rngs(0)))  # shapes only
    with pytest.raises(nn.ShapeError, match=r"\(2, 5\)"):
        model(jnp.ones((2, 5)))


# --------------------------------------------------------------------------- GlowFlow

GLOW_CONFIGS = {
    "flat": dict(event_shape=4, depth=3, hidden=16),
    "image": dict(event_shape=(4, 4, 1), depth=2, hidden=4),
}


@functools.cache
def glow(name, seed=0):
    """``(graphdef, params, event_shape)`` of an initialised flow, built once per session."""
    config = GLOW_CONFIGS[name]
    flow = models.GlowFlow(
        config["event_shape"],
        depth=config["depth"],
        hidden=config["hidden"],
        rngs=rngs(seed),
        param_dtype=F64,
    )
    shape = config["event_shape"]
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    # Data-dependent (ActNorm) initialisation on a shifted, scaled batch.
    flow.initialize(data((64, *shape), seed + 50, scale=2.0, shift=1.0))
    return *nnx.split(flow), shape


@functools.partial(jax.jit, static_argnums=0)
def glow_checks(graphdef, params, x):
    flow = nnx.merge(graphdef, params)
    z = flow(x)
    dim = math.prod(x.shape[1:])

    def one_example(v):
        return flow(v.reshape((1, *x.shape[1:]))).reshape(-1)

    jacobians = jax.vmap(jax.jacfwd(one_example))(x.reshape(x.shape[0], -1))
    log_det = jnp.linalg.slogdet(jacobians)[1]
    z_flat = z.reshape(z.shape[0], -1)
    brute_force = -0.5 * jnp.sum(z_flat**2, -1) - 0.5 * dim * jnp.log(2 * jnp.pi) + log_det
    return z, flow.inverse(z), flow.log_prob(x), brute_force


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", list(GLOW_CONFIGS))
def test_glow_inverts_and_log_prob_is_change_of_variables(name, seed):
    graphdef, params, shape = glow(name, seed)
    x = data((3, *shape), seed + 1, scale=2.0, shift=1.0)
    z, x_back, log_prob, brute_force = glow_checks(graphdef, params, x)
    np.testing.assert_allclose(x_back, x, rtol=0, atol=1e-10)
    assert z.shape == (3, *nnx.merge(graphdef, params).latent_shape)
    assert log_prob.shape == (3,)
    np.testing.assert_allclose(log_prob, brute_force, rtol=1e-10, atol=1e-10)


def test_glow_initialize_sets_actnorm_from_data():
    config = GLOW_CONFIGS["flat"]
    flow = models.GlowFlow(
        config["event_shape"],
        depth=config["depth"],
        hidden=config["hidden"],
        rngs=rngs(0),
        param_dtype=F64,
    )
    shape = flow.event_shape
    x = data((64, *shape), 0, scale=3.0, shift=2.0)
    z = flow.initialize(x)
    np.testing.assert_allclose(flow(x), z, atol=1e-10)  # the state was written
    # The first step's ActNorm standardises the data it was initialised on.
    h = flow.steps.layer(0).layers[0](x)
    np.testing.assert_allclose(h.mean(0), 0.0, atol=1e-10)
    np.testing.assert_allclose(h.std(0), 1.0, atol=1e-5)
    # Later ActNorms were initialised on their own inputs, not on x.
    later = np.asarray(flow.steps.layers.layers[0].log_scale[...])
    assert not np.allclose(later[0], later[1])


def test_glow_samples_have_the_data_shape_and_invert():
    graphdef, params, shape = glow("image")

    @jax.jit
    def sample_and_encode(params, key):
        flow = nnx.merge(graphdef, params)
        samples = flow.sample(key, 5)
        return samples, flow(samples)

    samples, z = sample_and_encode(params, jax.random.key(0))
    assert samples.shape == (5, *shape) and samples.dtype == F64
    assert np.all(np.isfinite(samples))
    # The samples are inverse(z) for standard normal z: encoding them gives that z back.
    expected = jax.random.normal(
        jax.random.key(0), (5, *nnx.merge(graphdef, params).latent_shape), F64
    )
    np.testing.assert_allclose(z, expected, atol=1e-10)


def test_glow_trains_with_adam():
    graphdef, params, shape = glow("flat")
    rng = np.random.default_rng(0)
    # Correlated two-moons-like data: a non-Gaussian target.
    t = rng.uniform(0, np.pi, 128)
    x = jnp.asarray(
        np.stack([np.cos(t), np.sin(t), 0.5 * np.cos(t) ** 2, t / 3], -1)
        + 0.05 * rng.standard_normal((128, 4)),
        F64,
    )
    _, losses = train(models.flow_loss(graphdef), params, (x,), steps=10)
    assert losses[-1] < losses[0] - 0.1


def test_glow_gradients_match_finite_differences():
    graphdef, params, shape = glow("flat")
    directional_check(models.flow_loss(graphdef), params, (data((5, *shape), 3),), seed=7)


@pytest.mark.parametrize("name", list(GLOW_CONFIGS))
def test_glow_moonwalk_grad_matches_jax_grad(name):
    graphdef, params, shape = glow(name)
    nll = models.flow_loss(graphdef)

    def loss(params, x, y):
        return nll(params, x) + 0.0 * jnp.sum(y)

    grads_match(loss, params, data((4, *shape), 8), jnp.zeros((4,), F64))


def test_glow_configuration_errors():
    with pytest.raises(nn.ConfigError, match="even"):
        models.GlowFlow(3, rngs=rngs(0))
    with pytest.raises(nn.ShapeError):
        models.GlowFlow((3, 4, 1), rngs=rngs(0))
    flow = nnx.eval_shape(lambda: models.GlowFlow(4, depth=1, rngs=rngs(0)))  # shapes only
    with pytest.raises(nn.ShapeError):
        flow.log_prob(jnp.ones((2, 6)))


# --------------------------------------------------------------------------- transformer


@functools.cache
def transformer(seed=1):
    """``(graphdef, params)`` of a small 2-block reversible transformer (width 2 x 4)."""
    model = models.ReversibleTransformer(4, 2, depth=2, rngs=rngs(seed), param_dtype=F64)
    return nnx.split(model)


@functools.partial(jax.jit, static_argnums=0)
def transformer_roundtrip(graphdef, params, x):
    model = nnx.merge(graphdef, params)
    y = model(x)
    return y, model.inverse(y)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_reversible_transformer_block_inverts_float64(seed, causal):
    block = models.ReversibleTransformerBlock(8, 2, rngs=rngs(seed), causal=causal, param_dtype=F64)
    x = data((2, 5, 16), seed)
    y, x_back = transformer_roundtrip(*nnx.split(block), x)
    assert y.shape == x.shape
    np.testing.assert_allclose(x_back, x, rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_reversible_transformer_inverts_float64(seed):
    model = models.ReversibleTransformer(8, 2, depth=3, rngs=rngs(seed), param_dtype=F64)
    for leaf in jax.tree.leaves(nnx.state(model)):
        assert leaf.shape[0] == 3
    x = data((2, 4, 16), seed + 3)
    y, x_back = transformer_roundtrip(*nnx.split(model), x)
    np.testing.assert_allclose(x_back, x, rtol=0, atol=1e-10)


def test_reversible_transformer_block_is_the_two_residual_steps():
    block = models.ReversibleTransformerBlock(4, 2, rngs=rngs(0), param_dtype=F64)

    @jax.jit
    def both(x):
        x1, x2 = x[..., :4], x[..., 4:]
        y1 = x1 + block.F(x2)
        y2 = x2 + block.G(y1)
        return block(x), jnp.concatenate([y1, y2], -1)

    got, expected = both(data((1, 3, 8), 0))
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert isinstance(block.F.layers[0], nnx.LayerNorm)
    assert isinstance(block.F.layers[1], models.SelfAttention)


def test_causal_attention_ignores_later_positions():
    attention = models.SelfAttention(4, 2, rngs=rngs(0), causal=True, param_dtype=F64)
    x = data((1, 5, 4), 0)
    changed = x.at[:, -1].add(1.0)
    np.testing.assert_allclose(attention(x)[:, :-1], attention(changed)[:, :-1], atol=1e-12)
    assert not np.allclose(attention(x)[:, -1], attention(changed)[:, -1])


def transformer_regression_loss(graphdef):
    def loss(params, x, y):
        out = nnx.merge(graphdef, params)(x)
        return jnp.mean((out.mean(axis=1)[:, :2] - y) ** 2)

    return loss


def test_reversible_transformer_trains_with_adam():
    graphdef, params = transformer()
    x = data((16, 3, 8), 0)
    y = jnp.stack([jnp.tanh(x[:, :, 3].sum(1)), jnp.sin(x[:, 0, 6])], -1)
    _, losses = train(transformer_regression_loss(graphdef), params, (x, y), steps=10)
    assert losses[-1] < 0.8 * losses[0]


def test_reversible_transformer_gradients_match_finite_differences():
    graphdef, params = transformer()
    x, y = data((2, 3, 8), 1), data((2, 2), 2)
    directional_check(transformer_regression_loss(graphdef), params, (x, y), seed=3)


def test_reversible_transformer_moonwalk_grad_matches_jax_grad():
    graphdef, params = transformer()
    x, y = data((2, 3, 8), 1), data((2, 2), 2)
    grads_match(transformer_regression_loss(graphdef), params, x, y)


def test_attention_heads_must_divide_width():
    with pytest.raises(nn.ConfigError, match="divisible"):
        models.ReversibleTransformerBlock(6, 4, rngs=rngs(0))


# ------------------------------------------------------------- training with moonwalk_grad


def _training_cases():
    """``name -> (loss(params, x, y), params, x, y)`` for every reference model."""
    def revnet_case(name):
        graphdef, params, shape = revnet(name)
        k = REVNET_CONFIGS[name]["num_classes"]
        return models.classifier_loss(graphdef), params, data((8, *shape), 11), labels(8, k, 12)

    def glow_case(name):
        graphdef, params, shape = glow(name)
        nll = models.flow_loss(graphdef)
        x = data((16, *shape), 13, scale=2.0, shift=1.0)
        return (lambda p, x, y: nll(p, x)), params, x, jnp.zeros((16,), F64)

    def transformer_case():
        graphdef, params = transformer()
        x = data((4, 3, 8), 14)
        return transformer_regression_loss(graphdef), params, x, data((4, 2), 15)

    return {"revnet_flat": lambda: revnet_case("flat"),
            "revnet_image": lambda: revnet_case("image"),
            "glow_flat": lambda: glow_case("flat"),
            "glow_image": lambda: glow_case("image"),
            "rev_transformer": transformer_case}


@pytest.mark.parametrize("name", list(_training_cases()))
def test_reference_models_train_step_for_step_like_backprop(name):
    """Adam with moonwalk_value_and_grad follows the jax.grad run: same losses and
    parameters at every step (float64)."""
    loss, params, x, y = _training_cases()[name]()
    p_ref, ref = train(loss, params, (x, y), steps=5)
    p_mw, got = train(loss, params, (x, y), steps=5,
                      value_and_grad=moonjax.moonwalk_value_and_grad)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=0)
    assert got[-1] < got[0]  # it trained
    for a, b in zip(jax.tree.leaves(p_mw), jax.tree.leaves(p_ref), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
