"""The benchmark networks: plain ``jnp`` layers, stacked parameters, one ``lax.scan``.

Every model is a chain ``h_i = layer(θ_i, h_{i-1})`` of ``depth`` identical layers run
by ``lax.scan`` over the stacked ``θ`` (the carry is the activation alone), followed
by a parameter-free head: a contracting dense map ``h_L W_out`` to ``n_classes``
logits per position and the mean negative log-likelihood under ``log_softmax``.
Each model also knows the exact inverse of one layer, which the reversible-backprop
baseline uses to rebuild activations on the way back.

How the stack is run is a flag of ``make_loss``, so the same model serves every
baseline: ``"plain"`` (a scan), ``"remat"`` (the scan body under ``jax.checkpoint``)
and ``"reversible"`` (a ``jax.custom_vjp`` whose backward pass inverts one layer at a
time, RevNet style, so nothing per layer is stored).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any
N_CLASSES = 8
# The leaky-ReLU slope. Inverting a deep leaky-ReLU stack (revbackprop rebuilds
# activations, Moonwalk's sweep solves g_i = g_{i-1} J_i^{-1}) multiplies round-off by
# the condition number of the whole chain, which grows geometrically with depth, the
# faster the smaller the slope. At slope 0.2 both lose every digit of float32 by depth
# 32; at 0.8 the relative gradient error at depth 256 is 3e-4 (Moonwalk) and 1e-2
# (revbackprop). See docs/benchmarks.md.
LEAKY_SLOPE = 0.8


@dataclasses.dataclass(frozen=True)
class Model:
    """One benchmark network.

    Attributes:
      name: the name used on the command line.
      summary: one line for the table and the docs.
      init_layer: ``(rng, depth, width, dtype) -> θ``: NumPy arrays for ``depth`` layers,
        stacked on a leading axis (``rng`` is a ``numpy.random.Generator``).
      layer: ``(θ, h) -> h'``, one layer.
      inverse: ``(θ, h') -> h``, its exact inverse.
      input_shape: ``(batch, width) -> shape`` of the network input ``x``.
      width: the default feature width (channels for images and sequences).
      batch: the default batch size.
      unrolled: the layers are a Python loop over a list of per-layer parameters (as
        most users write them), not a ``lax.scan`` over stacked ones.
      max_depth: the deepest it is measured at (``None``: any); unrolled programs
        compile in time that grows with depth.
    """

    name: str
    summary: str
    init_layer: Callable[[np.random.Generator, int, int, Any], PyTree]
    layer: Callable[[PyTree, jax.Array], jax.Array]
    inverse: Callable[[PyTree, jax.Array], jax.Array] | None
    input_shape: Callable[[int, int], tuple[int, ...]]
    width: int = 64
    batch: int = 64
    unrolled: bool = False
    max_depth: int | None = None


# -- shared pieces -------------------------------------------------------------------------


# Parameters and data come from NumPy's generator: instant at any depth, where jax.random
# would compile a new program for every shape.


def _normal(rng, shape, scale, dtype):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def _dense_init(rng, lead, d_in, d_out, dtype, gain=1.0):
    return _normal(rng, (*lead, d_in, d_out), gain / math.sqrt(d_in), dtype)


def _layer_norm(x, eps=1e-5):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean((x - mu) ** 2, -1, keepdims=True)
    return (x - mu) * lax.rsqrt(var + eps)


def _unleaky(y):
    return jnp.where(y >= 0, y, y / LEAKY_SLOPE)


# -- additive-coupling RevNet MLP ------------------------------------------------------------


def _revnet_init(rng, depth, width, dtype):
    half = width // 2
    return {
        "w1": _dense_init(rng, (depth,), half, width, dtype),
        "b1": np.zeros((depth, width), dtype),
        "w2": _dense_init(rng, (depth,), width, half, dtype, gain=0.2),
    }


def _revnet_side(p, x1):
    return jnp.tanh(x1 @ p["w1"] + p["b1"]) @ p["w2"]


def _additive_coupling(side):
    """``(layer, inverse)`` of the coupling ``y = [x2 + side(p, x1), x1]`` on channel
    halves (the last axis)."""

    def layer(p, h):
        x1, x2 = jnp.split(h, 2, -1)
        return jnp.concatenate([x2 + side(p, x1), x1], -1)

    def inverse(p, y):
        a, x1 = jnp.split(y, 2, -1)
        return jnp.concatenate([x1, a - side(p, x1)], -1)

    return layer, inverse


_revnet_layer, _revnet_inverse = _additive_coupling(_revnet_side)


# A training-sized batch: at batch 64 a 64-wide layer's parameters and their gradients
# (8 bytes per parameter) outweigh its activations, which caps every method's depth gain
# under a memory budget near 2x whatever it stores.
MLP_BATCH = 256

REVNET_MLP = Model(
    name="revnet_mlp",
    summary="additive-coupling RevNet MLP: y = [x2 + W2 tanh(W1 x1 + b1), x1]",
    init_layer=_revnet_init,
    layer=_revnet_layer,
    inverse=_revnet_inverse,
    input_shape=lambda batch, width: (batch, width),
    batch=MLP_BATCH,
)


# -- leaky-ReLU MLP --------------------------------------------------------------------------


def _leaky_init(rng, depth, width, dtype):
    # A scaled orthogonal weight: perfectly conditioned, and the gain keeps the expected
    # squared norm of h through leaky_relu (He-style), so deep stacks neither blow up
    # nor vanish.
    q, r = np.linalg.qr(rng.standard_normal((depth, width, width)))
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    gain = math.sqrt(2.0 / (1.0 + LEAKY_SLOPE**2))
    return {"w": (gain * q).astype(dtype), "b": np.zeros((depth, width), dtype)}


def _leaky_layer(p, h):
    return jax.nn.leaky_relu(h @ p["w"] + p["b"], LEAKY_SLOPE)


def _leaky_inverse(p, y):
    z = _unleaky(y) - p["b"]
    return jnp.linalg.solve(p["w"].T, z.T).T


LEAKY_MLP = Model(
    name="leaky_mlp",
    summary=f"leaky-ReLU MLP: y = leaky_relu(x W + b, {LEAKY_SLOPE}), W square (scaled orthogonal)",
    init_layer=_leaky_init,
    layer=_leaky_layer,
    inverse=_leaky_inverse,
    input_shape=lambda batch, width: (batch, width),
    batch=MLP_BATCH,
)


# -- convolutional RevNet --------------------------------------------------------------------

CONV_SPATIAL = 8


def _conv(x, k):
    return lax.conv_general_dilated(
        x, k, window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _conv_init(rng, depth, width, dtype):
    half = width // 2
    return {
        "k1": _normal(rng, (depth, 3, 3, half, half), 1.0 / math.sqrt(9 * half), dtype),
        "b1": np.zeros((depth, half), dtype),
        "k2": _normal(rng, (depth, 3, 3, half, half), 0.2 / math.sqrt(9 * half), dtype),
    }


def _conv_side(p, x1):
    return _conv(jnp.tanh(_conv(x1, p["k1"]) + p["b1"]), p["k2"])


_conv_layer, _conv_inverse = _additive_coupling(_conv_side)


CONV_REVNET = Model(
    name="conv_revnet",
    summary=f"conv RevNet: additive coupling on NHWC channel halves, side = 3x3 conv, tanh, "
    f"3x3 conv ({CONV_SPATIAL}x{CONV_SPATIAL} images)",
    init_layer=_conv_init,
    layer=_conv_layer,
    inverse=_conv_inverse,
    input_shape=lambda batch, width: (batch, CONV_SPATIAL, CONV_SPATIAL, width),
    width=16,
    batch=8,
)


# -- reversible transformer block --------------------------------------------------------------

SEQ_LEN = 16
HEADS = 4


def _xf_init(rng, depth, width, dtype):
    d, lead = width // 2, (depth,)
    return {
        "wq": _dense_init(rng, lead, d, d, dtype),
        "wk": _dense_init(rng, lead, d, d, dtype),
        "wv": _dense_init(rng, lead, d, d, dtype),
        "wo": _dense_init(rng, lead, d, d, dtype, gain=0.2),
        "w1": _dense_init(rng, lead, d, 2 * d, dtype),
        "b1": np.zeros((depth, 2 * d), dtype),
        "w2": _dense_init(rng, lead, 2 * d, d, dtype, gain=0.2),
    }


def _attention(p, x):
    b, t, d = x.shape
    hd = d // HEADS
    split = lambda z: z.reshape(b, t, HEADS, hd)
    q, k, v = split(x @ p["wq"]), split(x @ p["wk"]), split(x @ p["wv"])
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k) / math.sqrt(hd)
    out = jnp.einsum("bhqk,bkhc->bqhc", jax.nn.softmax(logits, -1), v)
    return out.reshape(b, t, d) @ p["wo"]


def _mlp(p, x):
    return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"]


def _xf_layer(p, h):
    x1, x2 = jnp.split(h, 2, -1)
    y1 = x1 + _attention(p, _layer_norm(x2))
    y2 = x2 + _mlp(p, _layer_norm(y1))
    return jnp.concatenate([y1, y2], -1)


def _xf_inverse(p, y):
    y1, y2 = jnp.split(y, 2, -1)
    x2 = y2 - _mlp(p, _layer_norm(y1))
    x1 = y1 - _attention(p, _layer_norm(x2))
    return jnp.concatenate([x1, x2], -1)


REV_TRANSFORMER = Model(
    name="rev_transformer",
    summary=f"reversible transformer block on (B, {SEQ_LEN}, 2d): y1 = x1 + Attn(LN(x2)), "
    f"y2 = x2 + MLP(LN(y1)), {HEADS} heads",
    init_layer=_xf_init,
    layer=_xf_layer,
    inverse=_xf_inverse,
    input_shape=lambda batch, width: (batch, SEQ_LEN, width),
    width=32,
    batch=8,
)


# -- unrolled: a Python loop over a list of layers ------------------------------------------

UNROLLED_DEPTH = 64

REVNET_UNROLLED = dataclasses.replace(
    REVNET_MLP, name="revnet_unrolled", unrolled=True, max_depth=UNROLLED_DEPTH,
    summary="revnet_mlp's coupling written as a Python loop over a list of layers")


def _relu_init(rng, depth, width, dtype):
    return {"w": _dense_init(rng, (depth,), width, width, dtype, gain=math.sqrt(2.0)),
            "b": np.zeros((depth, width), dtype)}


RELU_MLP = Model(
    name="relu_mlp",
    summary="ReLU MLP as a Python loop: y = relu(x W + b), W square (He init); no inverse",
    init_layer=_relu_init,
    layer=lambda p, h: jax.nn.relu(h @ p["w"] + p["b"]),
    inverse=None,
    input_shape=lambda batch, width: (batch, width),
    batch=MLP_BATCH,
    unrolled=True,
    max_depth=UNROLLED_DEPTH,
)


MODELS: dict[str, Model] = {
    m.name: m for m in (REVNET_MLP, LEAKY_MLP, CONV_REVNET, REV_TRANSFORMER,
                        REVNET_UNROLLED, RELU_MLP)
}


# -- parameters, data, loss ------------------------------------------------------------------


def init_params(model: Model, seed: int, depth: int, width: int, dtype=jnp.float32) -> PyTree:
    """``{"layers": θ stacked on a leading axis of size depth, "head": W_out}``; for an
    unrolled model ``"layers"`` is a list of each layer's own ``θ``."""
    if width % 2 or width < N_CLASSES:
        raise ValueError(f"width must be even and >= {N_CLASSES}, got {width}")
    rng = np.random.default_rng([seed, 0])
    layers = model.init_layer(rng, depth, width, np.dtype(dtype))
    head = _dense_init(rng, (), width, N_CLASSES, np.dtype(dtype))
    if model.unrolled:
        layers = [jax.tree_util.tree_map(lambda a, i=i: a[i], layers) for i in range(depth)]
    return jax.tree_util.tree_map(jnp.asarray, {"layers": layers, "head": head})


def param_shapes(model: Model, depth: int, width: int, dtype=jnp.float32) -> PyTree:
    """The ``jax.ShapeDtypeStruct`` s of ``init_params`` (nothing is allocated)."""
    one = init_params(model, 0, 1, width, dtype)
    sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    if model.unrolled:
        layers = [jax.tree_util.tree_map(sds, one["layers"][0])] * depth
    else:
        layers = jax.tree_util.tree_map(
            lambda a: jax.ShapeDtypeStruct((depth, *a.shape[1:]), a.dtype), one["layers"])
    return {"layers": layers, "head": sds(one["head"])}


def make_data(
    model: Model, seed: int, batch: int, width: int, dtype=jnp.float32
) -> tuple[jax.Array, jax.Array]:
    """A random input ``x`` and integer labels ``y`` (one per position)."""
    shape = model.input_shape(batch, width)
    rng = np.random.default_rng([seed, 1])
    x = rng.standard_normal(shape).astype(np.dtype(dtype))
    y = rng.integers(0, N_CLASSES, shape[:-1]).astype(np.int32)
    return jnp.asarray(x), jnp.asarray(y)


def param_count(params: PyTree) -> int:
    return sum(int(math.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _scan(layer, layers, h):
    return lax.scan(lambda c, p: (layer(p, c), None), h, layers)[0]


def _unrolled(layer, layers, h):
    for p in layers:
        h = layer(p, h)
    return h


def reversible_stack(layer: Callable, inverse: Callable, unrolled: bool = False) -> Callable:
    """``run(layers, h)``: a stack whose gradient rebuilds activations by inversion.

    The forward pass keeps only the stack's output. The backward pass walks the layers
    from the top: ``h_{i-1} = inverse(θ_i, h_i)``, then one layer's vjp gives
    ``(∂ℓ/∂θ_i, g_{i-1})`` from ``g_i``. Memory does not grow with depth; round-off in
    the rebuilt activations is the price (it shows in the gradient-error column). The
    stack is a ``lax.scan`` over stacked ``layers``, or with ``unrolled`` a Python loop
    over a list of them.
    """
    forward = _unrolled if unrolled else _scan

    @jax.custom_vjp
    def run(layers, h):
        return forward(layer, layers, h)

    def run_fwd(layers, h):
        out = forward(layer, layers, h)
        return out, (layers, out)

    def back(carry, p):  # one layer, from its output and its output's cotangent
        y, g_y = carry
        x = inverse(p, y)
        _, pullback = jax.vjp(layer, p, x)
        g_p, g_x = pullback(g_y)
        return (x, g_x), g_p

    def run_bwd(res, g_out):
        layers, out = res
        if not unrolled:
            (_, g_in), g_layers = lax.scan(back, (out, g_out), layers, reverse=True)
            return g_layers, g_in
        carry, g_layers = (out, g_out), []
        for p in reversed(layers):
            carry, g_p = back(carry, p)
            g_layers.append(g_p)
        return g_layers[::-1], carry[1]

    run.defvjp(run_fwd, run_bwd)
    return run


STACKS = ("plain", "remat", "reversible")


def make_loss(model: Model, stack: str = "plain") -> Callable:
    """``loss(params, x, y)`` with the stack run as ``stack`` (one of ``STACKS``)."""
    if model.unrolled:
        if stack == "plain":
            run = lambda layers, h: _unrolled(model.layer, layers, h)
        elif stack == "remat":
            run = lambda layers, h: _unrolled(jax.checkpoint(model.layer), layers, h)
        elif stack == "reversible" and model.inverse is not None:
            run = reversible_stack(model.layer, model.inverse, unrolled=True)
        else:
            raise ValueError(f"stack must be one of {STACKS} (reversible needs an "
                             f"inverse), got {stack!r}")
    elif stack == "plain":
        run = lambda layers, h: _scan(model.layer, layers, h)
    elif stack == "remat":
        body = jax.checkpoint(lambda c, p: (model.layer(p, c), None))
        run = lambda layers, h: lax.scan(body, h, layers)[0]
    elif stack == "reversible" and model.inverse is not None:
        run = reversible_stack(model.layer, model.inverse)
    else:
        raise ValueError(f"stack must be one of {STACKS}, got {stack!r}")

    def loss(params, x, y):
        h = run(params["layers"], x)
        logp = jax.nn.log_softmax(h @ params["head"], -1)
        picked = jnp.take_along_axis(logp, y[..., None], -1)
        return -jnp.mean(picked)

    loss.__name__ = f"{model.name}_{stack}_loss"
    return loss
