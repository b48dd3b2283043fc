"""Normalising-flow patterns: log-determinant carries, gather permutations, masks.

Each test compares ``moonwalk_grad`` with ``jax.grad`` in float64 over several seeds.
"""

import re

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from nets import assert_grads_close

import moonjax


def coupling(h, p):
    """An affine coupling: ``b ↦ b·exp(s(a)) + t(a)``; returns ``(y, sum s)``."""
    a, b = jnp.split(h, 2, -1)
    s = jnp.tanh(a @ p["v"])
    b = b * jnp.exp(s) + jnp.tanh(a @ p["w"])
    return jnp.concatenate([b, a], -1), jnp.sum(s, -1)


def flow_params(seed, depth=4, dim=4):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    half = dim // 2
    return {"w": jax.random.normal(k1, (depth, half, half)),
            "v": 0.3 * jax.random.normal(k2, (depth, half, half)),
            "scale0": 0.2 * jax.random.normal(k3, (dim,))}


def data(seed, batch=6, dim=4):
    return jax.random.normal(jax.random.PRNGKey(100 + seed), (batch, dim))


def nll(h, ld):
    return jnp.mean(0.5 * jnp.sum(h ** 2, -1) - ld)


def accumulating_flow(update, reverse=False):
    def loss(params, x):
        # the log-determinant starts from the parameters alone (a base scaling)
        h = x * jnp.exp(params["scale0"])
        ld0 = jnp.full(x.shape[:1], jnp.sum(params["scale0"]))

        def step(carry, p):
            h, ld = carry
            h, ld_step = coupling(h, p)
            return (h, update(ld, ld_step)), None

        layers = {k: params[k] for k in ("w", "v")}
        (h, ld), _ = lax.scan(step, (h, ld0), layers, reverse=reverse)
        return nll(h, ld)

    return loss


@pytest.mark.parametrize("update,reverse", [
    (lambda ld, s: ld + s, False),
    (lambda ld, s: ld + s, True),
    (lambda ld, s: 0.9 * ld + s ** 2, False),  # any accumulator, not only a sum
])
def test_scan_carry_accumulating_from_a_constant_is_exact(x64, update, reverse):
    loss = accumulating_flow(update, reverse)
    for seed in range(3):
        params, x = flow_params(seed), data(seed)
        got = moonjax.moonwalk_grad(loss)(params, x)
        assert_grads_close(got, jax.jit(jax.grad(loss))(params, x))


def test_log_det_carry_records_one_cotangent_per_step(x64):
    loss = accumulating_flow(lambda ld, s: ld + s)
    params, x = flow_params(0), data(0)
    report = moonjax.check(loss, params, x, mode="mixed")  # the sweep (the default: below)
    assert report.ok, report
    (scan,) = [g for g in report.groups if g.role == "scan"]
    # inside the loop only the log-det's cotangent is recorded: one float64 per
    # example and layer; the activations are swept (no fragment of the coupling)
    assert scan.fragment_bytes == 4 * 6 * 8, report
    assert all(g.fragment_bytes == 0 for g in scan.groups if g.role != "spine"
               or "coupling" in g.location), report


def test_log_det_carry_without_fragments_keeps_the_structure_error(x64):
    loss = accumulating_flow(lambda ld, s: ld + s)
    with pytest.raises(moonjax.SpineStructureError,
                       match=re.escape("scan carry 1 starts as a constant")):
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(flow_params(0), data(0))


@pytest.mark.parametrize("depth,stability", [(8, "drift-checked"), (20, "anchored every 16")])
def test_the_default_runs_a_log_det_flow_by_anchored_reversible_backprop(x64, depth, stability):
    # its inverse subtracts and divides by the scales: reversible backprop, the carries
    # (activations and log-det) stored every 16 steps (8 layers: the loop's input is the
    # only anchor; 20: blocks of 16 and 4); nothing recorded per step
    loss = accumulating_flow(lambda ld, s: ld + s)
    report = moonjax.check(loss, flow_params(0, depth=depth), data(0))
    assert report.treatment == "reversible", report.plan
    (scan,) = [g for g in report.groups if g.role == "scan"]
    assert scan.stability == stability, scan


@pytest.mark.parametrize("depth,anchor_every,reverse", [
    (7, 3, False), (7, 3, True), (10, 4, True), (40, "auto", False), (5, 1, False)])
def test_reversible_backprop_anchored_with_a_shorter_last_block_is_exact(
        x64, depth, anchor_every, reverse):
    # k need not divide the depth: the last block is shorter, and the rebuilt carry
    # is measured against the stored one at every block's start
    loss = accumulating_flow(lambda ld, s: ld + s, reverse)
    grad = moonjax.moonwalk_value_and_grad(loss, mode="reversible", anchor_every=anchor_every)
    for seed in range(2):
        params, x = flow_params(seed, depth=depth), data(seed)
        got, drifts, _, tol = grad.drifts(params, x)
        assert_grads_close(got, jax.grad(loss)(params, x))
        k = 32 if anchor_every == "auto" else anchor_every  # forced: twice the default's 16
        (where, drift), = drifts
        assert f"the carry stored every {k} steps" in where.describe(), where.describe()
        assert 0 <= drift < 1e-12, drift


def test_a_prime_depth_stores_no_more_carries_than_its_neighbour(x32):
    # blocks of 16 whatever the depth: 31 layers keep what 32 keep, not a carry per layer
    temps = {}
    for depth in (31, 32):
        params = flow_params(0, depth=depth, dim=64)
        params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
        x = data(0, batch=128, dim=64).astype(jnp.float32)
        loss = accumulating_flow(lambda ld, s: ld + s)
        compiled = jax.jit(moonjax.moonwalk_grad(loss)).lower(params, x).compile()
        temps[depth] = compiled.memory_analysis().temp_size_in_bytes
    assert temps[31] <= 1.05 * temps[32], temps


def test_a_loss_that_overflows_is_said_to_overflow(x32):
    # jax.grad's gradient is not finite either; the check says why instead of a drift
    loss = accumulating_flow(lambda ld, s: ld + s)
    params = jax.tree.map(lambda a: a.astype(jnp.float32), flow_params(0))
    x = 1e38 * data(0).astype(jnp.float32)
    assert not jnp.isfinite(loss(params, x))
    with pytest.raises(moonjax.DriftError, match="the loss is inf: the forward pass itself"):
        moonjax.moonwalk_grad(loss, mode="reversible")(params, x)
    # the default recomputes the loop exactly and returns what jax.grad returns
    got = moonjax.moonwalk_grad(loss)(params, x)
    want = jax.grad(loss)(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert bool(jnp.all(jnp.isfinite(a) == jnp.isfinite(b)))


# -- masks as partitions (distrax.MaskedCoupling's pattern) ----------------------------


def masked_flow(depth, conditioner_mask=None, iota=False):
    """``x = where(m, y, (y - t(c)) * exp(-s(c)))`` with ``c = where(m, y, 0)`` and the
    masks alternating; the log-determinant summed after its mask, as distrax does."""
    def loss(params, x):
        dim = x.shape[-1]
        base = (jnp.arange(dim) % 2 == 0) if iota else jnp.asarray([True, False] * (dim // 2))
        h, ld = x, jnp.zeros(x.shape[:1])
        for i in range(depth):
            m = base if i % 2 == 0 else ~base
            cm = m if conditioner_mask is None else conditioner_mask(m)
            c = jnp.where(cm, h, 0.0)
            hidden = jnp.tanh(c @ params["w1"][i])
            shift, log_scale = hidden @ params["w2"][i], jnp.tanh(hidden @ params["w3"][i])
            h = jnp.where(m, h, (h - shift) * jnp.exp(-log_scale))
            ld = ld + jnp.sum(jnp.where(m, 0.0, -log_scale), -1)
        return jnp.mean(0.5 * jnp.sum(h ** 2, -1) - ld)

    return loss


def masked_params(seed, depth, dim=4, width=6):
    k = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"w1": jax.random.normal(k[0], (depth, dim, width)) / 2,
            "w2": jax.random.normal(k[1], (depth, width, dim)) / 2,
            "w3": jax.random.normal(k[2], (depth, width, dim)) / 2}


@pytest.mark.parametrize("depth,iota", [(3, False), (6, True)])
def test_masked_coupling_is_a_partition(x64, depth, iota):
    loss = masked_flow(depth, iota=iota)
    for seed in range(2):
        params, x = masked_params(seed, depth), data(seed)
        assert_grads_close(moonjax.moonwalk_grad(loss, mode="mixed")(params, x),
                           jax.grad(loss)(params, x))
    report = moonjax.check(loss, params, x, mode="mixed")
    assert report.rules["select_n"] == ("mask partition",), report.rules
    # what phase 1 records per layer: the log-determinant's sum (one float per example),
    # never an activation; the loss head's square records one (as for any flow)
    recorded = [g.fragment_bytes for g in report.groups if g.fragment_bytes]
    activation = x.size * x.dtype.itemsize
    assert sum(b >= activation for b in recorded) <= 1, recorded
    assert report.fragment_bytes <= depth * x.shape[0] * 8 + 2 * activation, recorded


def test_a_mask_that_does_not_partition_is_refused_at_run_time(x64):
    # the conditioner reads every entry: not a coupling; the partition check fails, the
    # cotangent is NaN and the drift check refuses the gradient
    loss = masked_flow(3, conditioner_mask=lambda m: jnp.ones_like(m))
    params, x = masked_params(0, 3), data(0)
    grad = moonjax.moonwalk_grad(loss, mode="mixed", on_drift="nan")(params, x)
    assert all(bool(jnp.all(jnp.isnan(g))) for g in jax.tree.leaves(grad))
    with pytest.raises(moonjax.DriftError, match="non-finite"):
        moonjax.moonwalk_grad(loss, mode="mixed")(params, x)


def product_flow(depth, mask=lambda m: m, keep=lambda m: 1 - m):
    """The classic RealNVP with masks written as products: ``c = h * m`` read by the
    conditioner, ``h = c + (1 - m) * (h * exp(s) + t)``."""
    def loss(params, x):
        base = jnp.asarray([1.0, 0.0] * (x.shape[-1] // 2))
        h, ld = x, 0.0
        for i in range(depth):
            m = mask(base if i % 2 == 0 else 1 - base)
            c = h * m
            hidden = jnp.tanh(c @ params["w1"][i])
            t, s = hidden @ params["w2"][i], jnp.tanh(hidden @ params["w3"][i]) * keep(m)
            h = c + keep(m) * (h * jnp.exp(s) + t)
            ld = ld + jnp.sum(s, -1)
        return jnp.mean(0.5 * jnp.sum(h ** 2, -1) - ld)

    return loss


@pytest.mark.parametrize("depth", [2, 5])
def test_a_mask_written_as_products_is_a_partition(x64, depth):
    loss = product_flow(depth)
    for seed in range(2):
        params, x = masked_params(seed, depth), data(seed)
        assert_grads_close(moonjax.moonwalk_grad(loss)(params, x), jax.grad(loss)(params, x))
    report = moonjax.check(loss, params, x)
    assert "mask partition" in report.rules["mul"], report.rules
    recorded = [g.fragment_bytes for g in report.groups if g.fragment_bytes]
    activation = x.size * x.dtype.itemsize
    assert sum(b >= activation for b in recorded) <= 1, recorded


@pytest.mark.parametrize("mask,keep", [(lambda m: 0.5 + 0 * m, lambda m: 0.5 + 0 * m),
                                       (lambda m: m, lambda m: 0.5 * (1 - m))],
                         ids=["not 0/1", "not 1 - m"])
def test_products_that_do_not_partition_are_refused_at_run_time(x64, mask, keep):
    # the partition is checked, not assumed: the cotangent is NaN, the drift check
    # refuses the gradient
    loss = product_flow(2, mask, keep)
    params, x = masked_params(0, 2), data(0)
    with pytest.raises(moonjax.DriftError, match="non-finite"):
        moonjax.moonwalk_grad(loss, mode="mixed")(params, x)


def test_a_trained_gate_is_no_mask(x64):
    # y = a * h + (1 - a) * T(h; a * h) with a trained gate a: no partition; exact
    # through fragments as before the rule
    def loss(params, x):
        a = jax.nn.sigmoid(params["gate"])
        c = x * a
        shift = jnp.tanh(c @ params["w1"][0]) @ params["w2"][0]
        h = c + (1 - a) * (x + shift)
        return jnp.mean(jnp.sum(h ** 2, -1))

    params = {**masked_params(0, 1), "gate": jnp.linspace(-1.0, 1.0, 4)}
    x = data(0)
    assert_grads_close(moonjax.moonwalk_grad(loss)(params, x), jax.grad(loss)(params, x))


def test_products_with_constants_that_no_conditioner_reads_stay_elementwise(x64):
    # y = h * a + b * tanh(h) with constant arrays a, b: one elementwise map, swept by
    # its derivative (no partition is looked for)
    def loss(w, x):
        a, b = jnp.asarray([0.9, 0.8, 0.7, 0.6]), jnp.asarray([0.1, 0.2, 0.3, 0.4])
        h = x @ w
        h = h * a + b * jnp.tanh(h)
        return jnp.mean(jnp.tanh(h @ w) ** 2)

    w = jnp.eye(4) + 0.1 * jax.random.normal(jax.random.PRNGKey(0), (4, 4))
    x = data(0)
    assert_grads_close(moonjax.moonwalk_grad(loss, mode="mixed")(w, x), jax.grad(loss)(w, x))
    assert moonjax.check(loss, w, x, mode="mixed").submersive
