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


def test_the_default_runs_a_log_det_flow_by_anchored_reversible_backprop(x64):
    # its inverse subtracts and divides by the scales: reversible backprop, the carries
    # (activations and log-det) stored every 4 steps (8 layers: at 4 the loop's input
    # is the only anchor); nothing recorded per step
    loss = accumulating_flow(lambda ld, s: ld + s)
    report = moonjax.check(loss, flow_params(0, depth=8), data(0))
    assert report.treatment == "reversible", report.plan
    (scan,) = [g for g in report.groups if g.role == "scan"]
    assert scan.stability.startswith("anchored every"), scan
