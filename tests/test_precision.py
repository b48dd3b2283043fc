"""Low precision: what Moonwalk gives in bfloat16, float16 and float32 against float64.

Measured figures and their discussion: ``docs/reliability.md``.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from nets import LAYERS, classification_loss, scanned

import moonjax


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: a.astype(dtype), tree)


def _rel(a, b):
    a = [np.asarray(u, np.float64) for u in jax.tree_util.tree_leaves(a)]
    b = [np.asarray(u, np.float64) for u in jax.tree_util.tree_leaves(b)]
    num = sum(float(((u - v) ** 2).sum()) for u, v in zip(a, b, strict=True))
    return (num / sum(float((v ** 2).sum()) for v in b)) ** 0.5


def _case(kind, depth, d=8, batch=4, hidden=16):
    """A scanned network of ``nets.py`` with numpy float64 parameters and data (numpy
    spares compiling the random initialisers)."""
    rng = np.random.default_rng(0)
    if kind in ("leaky", "tanh"):
        params = {"w": np.eye(d) + 0.3 * rng.standard_normal((depth, d, d)) / np.sqrt(d),
                  "b": 0.1 * rng.standard_normal((depth, d))}
    else:
        h = d // 2
        params = {"w1": 0.5 * rng.standard_normal((depth, h, hidden)) / np.sqrt(h),
                  "b1": 0.1 * rng.standard_normal((depth, hidden)),
                  "w2": 0.5 * rng.standard_normal((depth, hidden, h)) / np.sqrt(hidden)}
    x = rng.standard_normal((batch, d))
    y = np.eye(d)[rng.integers(0, d, batch)]
    return classification_loss(scanned(LAYERS[kind])), (params, x, y)


def _three_grads(loss, args, dtype, **options):
    """float64 backprop, low-precision backprop and low-precision Moonwalk, in one program."""

    def three(args, low):
        return (jax.grad(loss)(*args), jax.grad(loss)(*low),
                moonjax.moonwalk_grad(loss, **options)(*low))

    return jax.jit(three)(args, _cast(args, dtype))


@pytest.mark.parametrize("kind, dtype", [("additive", jnp.bfloat16), ("affine", jnp.bfloat16),
                                         ("affine", jnp.float16)])
def test_low_precision_couplings_are_as_close_to_float64_as_backprop(kind, dtype):
    loss, args = _case(kind, depth=4)
    reference, backprop, got = _three_grads(loss, args, dtype)
    assert {a.dtype for a in jax.tree_util.tree_leaves(got)} == {jnp.dtype(dtype)}
    assert _rel(got, reference) <= 2 * _rel(backprop, reference)


@pytest.mark.parametrize("kind", ["leaky", "tanh"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("depth", [4, 16])
def test_low_precision_dense_layers_are_as_close_to_float64_as_backprop(kind, dtype, depth):
    # the sweep: float32 solves, float32 φ' and (by default for 16-bit inputs) auto
    # anchors; measured at most 1.3× backprop's error (docs/reliability.md)
    loss, args = _case(kind, depth=depth)
    reference, backprop, got = _three_grads(loss, args, dtype, mode="mixed")
    assert {a.dtype for a in jax.tree_util.tree_leaves(got)} == {jnp.dtype(dtype)}
    assert _rel(got, reference) <= 1.5 * _rel(backprop, reference)


def test_without_anchors_a_bfloat16_dense_sweep_drifts():
    # why 16-bit inputs get anchor_every="auto" by default
    loss, args = _case("leaky", depth=16)
    # an anchor interval longer than the network: no anchors
    with pytest.raises(jax.errors.JaxRuntimeError, match="inaccurate gradient"):
        jax.block_until_ready(_three_grads(loss, args, jnp.bfloat16, mode="mixed",
                                           anchor_every=1000))
    # the check is what stops it: unchecked, the gradient is far from backprop's
    reference, backprop, got = _three_grads(loss, args, jnp.bfloat16, mode="mixed",
                                            anchor_every=1000, drift_tol=1e30)
    assert _rel(got, reference) > 10 * _rel(backprop, reference)


def test_a_saturated_bfloat16_tanh_is_caught_by_debug():
    # |x| > 9: tanh' is 0 even in float32, phase 1 erased the cotangent there, and the
    # sweep divides 0 by 0; debug=True names the layer instead of returning NaN (the
    # default checkpoints this loop: reverse mode, which saturation does not disturb)
    loss, (params, x, y) = _case("tanh", depth=4)
    low = _cast((params, 3.0 * x, y), jnp.bfloat16)
    with pytest.raises(moonjax.NonFiniteCotangentError, match="tanh"):
        moonjax.moonwalk_grad(loss, mode="mixed", debug=True)(*low)
    assert moonjax.check(loss, *low).treatment == "checkpointed"
