"""Flows and blocks built by real libraries: flowjax, distrax with Haiku, i-ResNets.

Each is differentiated as a new user would (``-log_prob`` of the flow's own
distribution; the float leaves of ``equinox.partition`` / Haiku's params) and compared
with ``jax.grad`` in float64 over several seeds. What has no rule (a residual block, a
masked autoregressive transformer, a log-determinant reaching the loss outside the
spine) is exact under the default by recording a fragment; ``fragments=False`` keeps
the structure error.
"""

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from nets import assert_grads_close

import moonjax

DIM = 4


def data(seed, batch=8):
    return jax.random.normal(jax.random.PRNGKey(100 + seed), (batch, DIM))


# -- flowjax ---------------------------------------------------------------------------


def flowjax_nll(make):
    eqx = pytest.importorskip("equinox")
    pytest.importorskip("flowjax")
    from flowjax.distributions import Normal

    def build(seed):
        flow = make(jax.random.PRNGKey(seed), Normal(jnp.zeros(DIM)))
        params, static = eqx.partition(flow, eqx.is_inexact_array)

        def loss(params, x):
            return -jnp.mean(eqx.combine(params, static).log_prob(x))

        return loss, params

    return build


def _coupling(transformer):
    def make(key, base):
        from flowjax.bijections import Affine, RationalQuadraticSpline
        from flowjax.flows import coupling_flow

        t = Affine() if transformer == "affine" else RationalQuadraticSpline(knots=4,
                                                                             interval=3)
        return coupling_flow(key, base_dist=base, transformer=t, flow_layers=2, nn_width=8)

    return make


def _maf(key, base):
    from flowjax.flows import masked_autoregressive_flow

    return masked_autoregressive_flow(key, base_dist=base, flow_layers=2, nn_width=8)


@pytest.mark.parametrize("make", [_coupling("affine"), _coupling("spline"), _maf],
                         ids=["coupling_flow-Affine", "coupling_flow-RQSpline", "maf"])
def test_flowjax_flow_nll_matches_jax_grad(make):
    build = flowjax_nll(make)
    for seed in range(2):
        loss, params = build(seed)
        x = data(seed)
        assert_grads_close(moonjax.moonwalk_grad(loss)(params, x),
                           jax.grad(loss)(params, x))


# -- distrax with Haiku conditioners ---------------------------------------------------


def distrax_nll(kind, layers=3):
    hk = pytest.importorskip("haiku")
    distrax = pytest.importorskip("distrax")

    def log_prob(x):
        mask = jnp.arange(DIM) % 2 == 0
        bijectors = []
        for i in range(layers):
            def affine(params):
                return distrax.ScalarAffine(shift=params[..., 0],
                                            log_scale=jnp.tanh(params[..., 1]))

            width = DIM if kind == "masked" else DIM // 2
            conditioner = hk.Sequential([hk.Linear(8), jnp.tanh, hk.Linear(2 * width),
                                         hk.Reshape((width, 2), preserve_dims=-1)])
            if kind == "masked":
                bijectors.append(distrax.MaskedCoupling(mask=mask, bijector=affine,
                                                        conditioner=conditioner))
                mask = ~mask
            else:
                bijectors.append(distrax.SplitCoupling(
                    split_index=DIM // 2, event_ndims=1, bijector=affine,
                    conditioner=conditioner, swap=bool(i % 2)))
        base = distrax.MultivariateNormalDiag(jnp.zeros(DIM), jnp.ones(DIM))
        return distrax.Transformed(base, distrax.Chain(bijectors)).log_prob(x)

    f = hk.without_apply_rng(hk.transform(log_prob))
    return f, (lambda params, x: -jnp.mean(f.apply(params, x)))


@pytest.mark.parametrize("kind", ["masked", "split"])
def test_distrax_realnvp_nll_matches_jax_grad(kind):
    f, loss = distrax_nll(kind)
    for seed in range(2):
        x = data(seed)
        params = f.init(jax.random.PRNGKey(seed), x)
        assert_grads_close(moonjax.moonwalk_grad(loss)(params, x),
                           jax.grad(loss)(params, x))


def test_distrax_masked_coupling_records_what_a_split_coupling_does():
    # the mask partitions the activations as the split does: phase 1 records the
    # log-determinant's per-example sums and the loss head, no activation per layer
    recorded = {}
    for kind in ("masked", "split"):
        f, loss = distrax_nll(kind, layers=5)
        x = data(0)
        report = moonjax.check(loss, f.init(jax.random.PRNGKey(0), x), x)
        assert report.ok, report
        recorded[kind] = report.fragment_bytes
    assert recorded["masked"] <= recorded["split"], recorded


def test_distrax_log_det_outside_the_spine_without_fragments_is_the_structure_error():
    f, loss = distrax_nll("split")
    x = data(0)
    with pytest.raises(moonjax.SpineStructureError):
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(
            f.init(jax.random.PRNGKey(0), x), x)


# -- i-ResNet: residual blocks with no rule ---------------------------------------------


def iresnet(scanned):
    def block(h, w):
        return h + 0.1 * jnp.tanh(h @ w)

    def loss(ws, x):
        if scanned:
            h, _ = lax.scan(lambda h, w: (block(h, w), None), x, ws)
        else:
            h = x
            for w in ws:
                h = block(h, w)
        return jnp.mean(jnp.sum(h ** 2, -1))

    return loss


@pytest.mark.parametrize("scanned", [False, True], ids=["unrolled", "scan"])
def test_iresnet_stack_is_exact_by_a_fragment_per_step(scanned):
    loss, depth = iresnet(scanned), 5
    for seed in range(2):
        ws = jax.random.normal(jax.random.PRNGKey(seed), (depth, DIM, DIM))
        x = data(seed)
        assert_grads_close(moonjax.moonwalk_grad(loss)(ws, x), jax.grad(loss)(ws, x))
    # the default checkpoints a loop of them (reverse mode: no fragments); Moonwalk's
    # sweep records one cotangent of the block's output per step
    assert moonjax.check(loss, ws, x).treatment == ("checkpointed" if scanned else "reverse")
    for mode in ("mixed", "reversible", "forward"):  # the same fallbacks in every mode
        assert_grads_close(moonjax.moonwalk_grad(loss, mode=mode)(ws, x), jax.grad(loss)(ws, x))
    report = moonjax.check(loss, ws, x, mode="mixed")
    assert report.ok, report
    per_step = sum(g.fragment_bytes for g in report.groups
                   if g.role == "scan" or "iresnet.<locals>.block" in g.location)
    assert per_step == depth * x.size * x.dtype.itemsize, report.groups
    with pytest.raises(moonjax.SpineStructureError, match="feeds 2 operations"):
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(ws, x)


def test_flowjax_coupling_flow_memory_is_a_fraction_of_jax_grads(x32):
    """Affine layers, dimension 16, nn_width 128, batch 256, float32: the default runs
    anchored reversible backprop. Measured at 16 / 64 layers: 612 / 715 KB against
    jax.grad's 3.6 / 13.8 MB (0.05x at 64). From 16 layers on, the exact recompute of a
    drifting block holds one block of 16 steps' carries whatever the depth; what grows
    is the stored block starts: 103 KB (6.3 carries) from 16 to 64 layers."""
    eqx = pytest.importorskip("equinox")
    pytest.importorskip("flowjax")
    from flowjax.bijections import Affine
    from flowjax.distributions import Normal
    from flowjax.flows import coupling_flow

    x = jnp.zeros((256, 16), jnp.float32)
    temps = {}
    for layers in (16, 64):
        flow = coupling_flow(jax.random.PRNGKey(0), base_dist=Normal(jnp.zeros(16)),
                             transformer=Affine(), flow_layers=layers, nn_width=128)
        params, static = eqx.partition(flow, eqx.is_inexact_array)

        def loss(params, x, static=static):
            return -jnp.mean(eqx.combine(params, static).log_prob(x))

        for name, grad in (("default", moonjax.moonwalk_grad(loss)), ("jax", jax.grad(loss))):
            compiled = jax.jit(grad).lower(params, x).compile()
            temps[name, layers] = compiled.memory_analysis().temp_size_in_bytes
    carry = 256 * 16 * 4
    assert temps["default", 64] <= 0.1 * temps["jax", 64], temps
    assert temps["default", 64] - temps["default", 16] <= 8 * carry, temps


# -- a Flax NNX CNN: conv, ReLU, max-pool, dense ----------------------------------------


def nnx_cnn():
    from flax import nnx
    from flax.linen import max_pool

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs, param_dtype=jnp.float64)
            self.dense = nnx.Linear(4 * 4 * 4, 10, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            h = max_pool(jax.nn.relu(self.conv(x)), (2, 2), (2, 2))  # marker: cnn
            return self.dense(h.reshape(h.shape[0], -1))

    graphdef, state = nnx.split(CNN(nnx.Rngs(0)))

    def loss(state, x, y):
        logits = nnx.merge(graphdef, state)(x)
        return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * y, -1))

    return loss, state


@pytest.mark.parametrize("mode", ["auto", "mixed", "reversible", "forward"])
def test_nnx_cnn_is_exact(mode, x64):
    loss, state = nnx_cnn()
    for seed in range(2):
        x = jax.random.normal(jax.random.PRNGKey(seed), (6, 8, 8, 1), jnp.float64)
        y = jax.nn.one_hot(jnp.arange(6) % 10, 10, dtype=jnp.float64)
        assert_grads_close(moonjax.moonwalk_grad(loss, mode=mode)(state, x, y),
                           jax.grad(loss)(state, x, y))


def test_nnx_cnn_in_forward_mode_without_fragments_names_the_conv(x64):
    # forward phase 1 records the conv's and the ReLU's cotangents by JVPs; without
    # fragments the sweep cannot cross the conv
    loss, state = nnx_cnn()
    x = jnp.ones((2, 8, 8, 1), jnp.float64)
    y = jax.nn.one_hot(jnp.arange(2), 10, dtype=jnp.float64)
    with pytest.raises(moonjax.UnsupportedPrimitiveError, match="conv_general_dilated"):
        moonjax.moonwalk_grad(loss, mode="forward", fragments=False)(state, x, y)
