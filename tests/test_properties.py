"""Property-based tests: random networks of supported layers match ``jax.grad``; random
unsupported mutations raise a ``moonjax.MoonjaxError`` and never return a gradient.

A network is drawn as a :class:`Net`: a stack of ``depth`` (1..6) layers on a
``(batch, width)`` spine (``width`` even, 2..12; ``batch`` 1..5), unrolled or as one
``lax.scan`` over stacked parameters, from the families Moonwalk supports:

* ``dense``: a square dense layer and ``leaky_relu`` (slope in [0.3, 2]), ``tanh`` or
  ``sinh``;
* ``additive``: an additive coupling ``[x2 + t(x1), x1]`` with a dense-tanh-dense ``t``;
* ``affine``: an affine coupling ``[x2 * sigmoid(s + 2) + t, x1]``;
* ``move``: a reshape/transpose permutation of the features;

then a contracting dense head ``width -> k`` (``k <= width``) and a scalar loss. The
gradients are compared with ``jax.grad`` in float64 (relative error at most 1e-8).
A mutation inserts a ReLU, an expanding dense layer, ``jnp.sort`` or a residual
``x + dense(x)``: with ``fragments=False`` every one must raise; with fragments (the
default) the result must be the exact gradient, or an error for an unrolled residual
(a scanned one is rescued by recording the carry's cotangent), never a wrong one.

Hypothesis profiles, registered here (not in ``conftest.py``): ``ci``, the default (15
derandomized examples per test plus a few fixed ones, no deadline; about a minute on 2
CPU cores) and ``dev`` (200 random examples per test; about 12 minutes). Pick one with
the environment: ``HYPOTHESIS_PROFILE=dev python -m pytest tests/test_properties.py``.
(``--hypothesis-profile=dev`` needs the profiles registered in ``conftest.py``, which
runs before this module is imported.) A profile loaded elsewhere is left alone.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, note, settings
from hypothesis import strategies as st
from jax import lax

import moonjax

settings.register_profile("ci", max_examples=15, derandomize=True, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
if os.environ.get("HYPOTHESIS_PROFILE"):
    settings.load_profile(os.environ["HYPOTHESIS_PROFILE"])
elif settings.get_current_profile_name() == "default":  # not chosen on the command line
    settings.load_profile("ci")

TOL = 1e-8
HIDDEN = 3  # width of the coupling side networks

# Compiling dominates these tests: each example is a new program. Both gradients are
# compiled as one program with XLA's cheap optimisation level (numerics are unchanged:
# XLA's CPU fast-math is off either way), about three times faster to compile.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def both_grads(loss, params, x, y, **options):
    """``(moonwalk_grad(loss, **options), jax.grad(loss))`` at the arguments, compiled once."""
    both = lambda *a: (moonjax.moonwalk_grad(loss, **options)(*a), jax.grad(loss)(*a))
    return jax.jit(both, compiler_options=FAST_COMPILE)(params, x, y)


# -- networks as data ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Layer:
    family: str  # dense | additive | affine | move
    act: str = ""  # dense: leaky | tanh | sinh
    slope: float = 0.5


@dataclasses.dataclass(frozen=True)
class Net:
    width: int
    batch: int
    layers: tuple[Layer, ...]  # unrolled: one per depth; scanned: the body
    depth: int
    scanned: bool
    out: int
    seed: int
    mutation: str = ""  # relu | expand | sort | residual
    at: int = 0  # where the mutation goes (layer index; in a scan, the body)


ACTS = {
    "leaky": lambda z, slope: jax.nn.leaky_relu(z, slope),
    "tanh": lambda z, slope: jnp.tanh(z),
    "sinh": lambda z, slope: jnp.sinh(z),
}


def _apply_layer(layer: Layer, h, p):
    if layer.family == "dense":
        return ACTS[layer.act](h @ p["w"] + p["b"], layer.slope)
    if layer.family == "move":
        b, w = h.shape
        return jnp.transpose(h.reshape(b, 2, w // 2), (0, 2, 1)).reshape(b, w)
    x1, x2 = jnp.split(h, 2, -1)
    z = jnp.tanh(x1 @ p["w1"] + p["b1"])
    t = z @ p["w2"]
    if layer.family == "additive":
        return jnp.concatenate([x2 + t, x1], -1)
    return jnp.concatenate([x2 * jax.nn.sigmoid(t + 2.0) + jnp.tanh(t), x1], -1)


def _mutate(kind, h, p):
    if kind == "relu":
        return jax.nn.relu(h)
    if kind == "expand":  # width -> width + 2 -> width: the first one has a cokernel
        return jnp.tanh(h @ p["up"]) @ p["down"]
    if kind == "sort":
        return jnp.sort(h, axis=-1)
    if kind == "residual":  # h feeds two layers
        return h + jnp.tanh(h @ p["r"])
    return h


def _layer_params(rng, layer: Layer, width):
    h = width // 2
    if layer.family == "dense":
        # near the identity; sinh layers contract so that a stack of them stays finite
        scale = 0.5 if layer.act == "sinh" else 1.0
        w = scale * (np.eye(width) + 0.3 * rng.standard_normal((width, width)) / np.sqrt(width))
        return {"w": w, "b": 0.1 * rng.standard_normal(width)}
    if layer.family == "move":
        return {}
    return {"w1": rng.standard_normal((h, HIDDEN)) / np.sqrt(h),
            "b1": 0.1 * rng.standard_normal(HIDDEN),
            "w2": 0.5 * rng.standard_normal((HIDDEN, h)) / np.sqrt(HIDDEN)}


def _mutation_params(rng, kind, width):
    if kind == "expand":
        return {"up": rng.standard_normal((width, width + 2)) / np.sqrt(width),
                "down": rng.standard_normal((width + 2, width)) / np.sqrt(width + 2)}
    if kind == "residual":
        return {"r": 0.5 * rng.standard_normal((width, width)) / np.sqrt(width)}
    return {}


def build(net: Net):
    """``(loss, params, x, y)`` of ``net``: numpy float64 parameters and data."""
    rng = np.random.default_rng(net.seed)
    if net.scanned:
        stacked = [[_layer_params(rng, layer, net.width) for _ in range(net.depth)]
                   for layer in net.layers]
        layer_params = [jax.tree_util.tree_map(lambda *a: np.stack(a), *ps) if ps[0] else {}
                        for ps in stacked]
    else:
        layer_params = [_layer_params(rng, layer, net.width) for layer in net.layers]
    mut = _mutation_params(rng, net.mutation, net.width)
    if net.scanned and mut:
        mut = jax.tree_util.tree_map(lambda a: np.stack([a] * net.depth), mut)
    params = {"layers": layer_params, "mut": mut,
              "head": rng.standard_normal((net.width, net.out)) / np.sqrt(net.width)}
    x = rng.standard_normal((net.batch, net.width))
    y = rng.standard_normal((net.batch, net.out))

    def body(h, ps, mut):
        for i, (layer, p) in enumerate(zip(net.layers, ps, strict=True)):
            if net.mutation and i == net.at:
                h = _mutate(net.mutation, h, mut)
            h = _apply_layer(layer, h, p)
        return h

    def loss(params, x, y):
        if net.scanned:
            h = lax.scan(lambda h, ps: (body(h, ps[0], ps[1]), None), x,
                         (params["layers"], params["mut"]), length=net.depth)[0]
        else:
            h = body(x, params["layers"], params["mut"])
        return jnp.mean(jnp.tanh(h @ params["head"] - y) ** 2)

    return loss, params, x, y


# -- strategies -----------------------------------------------------------------------------


@st.composite
def layers(draw, families=("dense", "additive", "affine", "move")):
    family = draw(st.sampled_from(families))
    if family != "dense":
        return Layer(family)
    act = draw(st.sampled_from(sorted(ACTS)))
    slope = draw(st.floats(0.3, 2.0)) if act == "leaky" else 0.5
    return Layer("dense", act, slope)


@st.composite
def nets(draw, mutations=()):
    width = draw(st.integers(1, 6)) * 2
    depth = draw(st.integers(1, 6))
    scanned = draw(st.booleans())
    if scanned:  # one body, repeated: a parameterised layer, then maybe a move
        body = [draw(layers(("dense", "additive", "affine")))]
        if draw(st.booleans()):
            body.append(Layer("move"))
        stack = tuple(body)
    else:
        stack = tuple(draw(layers()) for _ in range(depth))
    mutation = draw(st.sampled_from(mutations)) if mutations else ""
    at = draw(st.integers(0, len(stack) - 1)) if mutation else 0
    return Net(width=width, batch=draw(st.integers(1, 5)), layers=stack, depth=depth,
               scanned=scanned, out=draw(st.integers(1, width)),
               seed=draw(st.integers(0, 2**16)), mutation=mutation, at=at)


def rel_err(a, b):
    num = sum(float(np.sum((np.asarray(u) - np.asarray(v)) ** 2))
              for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b),
                              strict=True))
    den = sum(float(np.sum(np.asarray(v) ** 2)) for v in jax.tree_util.tree_leaves(b))
    return (num / den) ** 0.5 if den else num ** 0.5


# -- properties -----------------------------------------------------------------------------


@given(nets())
@example(Net(12, 5, (Layer("dense", "leaky", 2.0), Layer("additive"), Layer("move"),
                     Layer("affine"), Layer("dense", "sinh"), Layer("dense", "tanh")),
             depth=6, scanned=False, out=5, seed=1))
@example(Net(6, 3, (Layer("affine"), Layer("move")), depth=6, scanned=True, out=6, seed=2))
@example(Net(4, 2, (Layer("dense", "leaky", 0.3),), depth=6, scanned=True, out=1, seed=3))
def test_random_submersive_networks_match_jax_grad_float64(net):
    note(repr(net))
    got, expected = both_grads(*build(net))
    err = rel_err(got, expected)
    note(f"relative error {err:.2e}")
    assert err <= TOL


MUTATIONS = ("relu", "expand", "sort", "residual")
# one sure example of each mutation, on top of the drawn ones
MUTATED = [Net(6, 2, (Layer("dense", "tanh"), Layer("additive"), Layer("dense", "leaky")),
               depth=3, scanned=m == "sort", out=3, seed=4, mutation=m, at=1)
           for m in MUTATIONS]


def _with_examples(test):
    for net in MUTATED:
        test = example(net)(test)
    return test


@_with_examples
@given(nets(mutations=MUTATIONS))
def test_unsupported_mutations_raise_without_fragments(net):
    note(repr(net))
    loss, params, x, y = build(net)
    with pytest.raises(moonjax.MoonjaxError):  # the sweep's errors (mode="mixed")
        moonjax.moonwalk_grad(loss, mode="mixed", fragments=False)(params, x, y)


@_with_examples
@given(nets(mutations=MUTATIONS))
def test_mutations_with_fragments_raise_or_are_exact(net):
    note(repr(net))
    try:
        got, expected = both_grads(*build(net))
    except moonjax.MoonjaxError as e:
        # a residual inside a scan body is rescued by recording the carry's cotangent;
        # an unrolled one reads a value twice at the top level: refused
        assert net.mutation == "residual" and not net.scanned, f"refused: {e}"
        return
    assert rel_err(got, expected) <= TOL
