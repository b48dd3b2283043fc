"""Anchored mixed mode keeps what unanchored mixed mode keeps plus the anchors, and
stays exact in float64.

The bench's leaky-ReLU MLP (slope 0.8, width 64, batch 256): each anchor is one
``[256, 64]`` float32 carry cotangent (64 KiB). Measured at depth 64 (XLA temp):
unanchored 0.36 MiB; anchored every 4 / 8 / 32: 1.50 / 1.00 / 0.62 MiB (16 / 8 / 2
anchors: 1 / 0.5 / 0.125 MiB; beyond them 2.3 carries whatever k, the inverses of a few
weights the sweep multiplies by among them). Before the sweep crossed an anchored loop as one loop
(it ran a loop of blocks, whose stacked outputs were copied: a second copy of every
layer's weight cotangent): 1.65 / 1.78 / 2.17 MiB.
"""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from nets import assert_grads_close

import moonjax
from moonjax.bench import _models as M

MODEL = M.LEAKY_MLP
DEPTH = 64
SLACK = 3  # carries beyond the anchors (measured: 2.3, whatever k)


@functools.cache
def _temp(anchor_every) -> int:
    """XLA temp bytes of forced mixed mode on the float32 bench model at ``DEPTH``."""
    params = M.init_params(MODEL, 0, DEPTH, MODEL.width, jnp.float32)
    x, y = M.make_data(MODEL, 0, MODEL.batch, MODEL.width, jnp.float32)
    fn = jax.jit(moonjax.moonwalk_grad(M.make_loss(MODEL, "plain"), mode="mixed",
                                       anchor_every=anchor_every, on_drift="nan"))
    return fn.lower(params, x, y).compile().memory_analysis().temp_size_in_bytes


def test_anchored_mixed_mode_keeps_the_unanchored_memory_plus_the_anchors(x32):
    carry = MODEL.batch * MODEL.width * 4
    for k in (4, 8):
        anchors = DEPTH // k * carry
        assert _temp(k) <= _temp(None) + anchors + SLACK * carry, k


def test_auto_anchors_a_leaky_mlp_every_sqrt_depth_steps(x32):
    # slope 0.8: (1/0.8)^k <= 100 allows 20 steps; sqrt(64) = 8 is fewer
    assert _temp("auto") == _temp(8)


def _leaky_loss(reverse: bool):
    def loss(params, x):
        h = lax.scan(lambda h, p: (jax.nn.leaky_relu(h @ p["w"] + p["b"], 0.8), None), x,
                     params, reverse=reverse)[0]
        return jnp.sum(jnp.tanh(h) ** 2)
    return loss


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("anchor_every", [3, "auto"])
def test_anchored_mixed_mode_is_exact_in_float64(x64, reverse, anchor_every):
    depth, width = 12, 6
    kw, kb, kx = jax.random.split(jax.random.key(0), 3)
    params = {"w": jnp.eye(width) + 0.3 * jax.random.normal(kw, (depth, width, width)),
              "b": 0.1 * jax.random.normal(kb, (depth, width))}
    x = jax.random.normal(kx, (5, width))
    loss = _leaky_loss(reverse)
    got = moonjax.moonwalk_grad(loss, mode="mixed", anchor_every=anchor_every)(params, x)
    assert_grads_close(got, jax.grad(loss)(params, x), rtol=1e-9)
