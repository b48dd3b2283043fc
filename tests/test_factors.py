"""The sweep solves with the factors a weight is built from, and factorises a free one once.

A dense layer ``y = x W`` is crossed by solving with ``W``. Where the program builds ``W``
from triangular, diagonal and constant permutation factors (``moonjax.nn.InvertibleDense``
and ``InvertibleConv1x1`` hold ``W = P L U``) the sweep solves with those factors: no
``lu`` primitive anywhere in the program. A free matrix gets one pivoted LU per call,
however many layers share it. Gradients are compared with ``jax.grad`` in float64.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402
from jax import lax  # noqa: E402
from jax.extend import core as jcore  # noqa: E402

import moonjax  # noqa: E402
from moonjax import nn  # noqa: E402
from moonjax._src import graph as G  # noqa: E402
from moonjax._src.rules.factors import Weight, weight_factors  # noqa: E402

F64 = jnp.float64
WIDTH = 6


def primitive_counts(jaxpr, counts=None) -> dict[str, int]:
    """How often each primitive occurs in ``jaxpr`` and all its sub-jaxprs."""
    counts = {} if counts is None else counts
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
        for value in eqn.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(item, jcore.ClosedJaxpr):
                    primitive_counts(item.jaxpr, counts)
                elif isinstance(item, jcore.Jaxpr):
                    primitive_counts(item, counts)
    return counts


def randomize(state, seed, scale=0.2):
    """``state`` moved off its initial values (NumPy noise: no kernel per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda a: jnp.asarray(np.asarray(a) + scale * rng.standard_normal(a.shape), a.dtype),
        state)


def data(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), F64)


def rngs(seed):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))


# --------------------------------------------------------------------------- models


def dense_block(r):
    return nn.Sequential(nn.InvertibleDense(WIDTH, rngs=r, param_dtype=F64), nn.LeakyReLU(0.5))


def conv_block(r):
    return nn.Sequential(nn.InvertibleConv1x1(4, rngs=r, param_dtype=F64), nn.LeakyReLU(0.5))


def glow_block(r):
    return nn.Sequential(nn.ActNorm(4, param_dtype=F64),
                         nn.InvertibleConv1x1(4, rngs=r, param_dtype=F64),
                         nn.AffineCoupling(4, 8, rngs=r, param_dtype=F64))


def stack(block, depth, seed):
    return nn.Stack(block, depth, rngs=rngs(seed))  # lax.scan over stacked parameters


def unrolled(block, depth, seed):
    r = rngs(seed)
    return nn.Sequential(*[block(r) for _ in range(depth)])  # a Python loop of layers


class ScannedDense(nnx.Module):
    """``nnx.vmap``-built layers run by ``nnx.scan``, as Flax's docs write a deep stack."""

    def __init__(self, depth, seed):
        @nnx.split_rngs(splits=depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return dense_block(r)

        self.layers = make(rngs(seed))

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def step(layer, h):
            return layer(h)

        return step(self.layers, x)


MODELS = {
    # name: (build(depth, seed), input shape, loss of (model, x))
    "dense_stack": (lambda d, s: stack(dense_block, d, s), (5, WIDTH), "tanh"),
    "dense_unrolled": (lambda d, s: unrolled(dense_block, d, s), (5, WIDTH), "tanh"),
    "dense_nnx_scan": (ScannedDense, (5, WIDTH), "tanh"),
    "conv_stack": (lambda d, s: stack(conv_block, d, s), (2, 3, 3, 4), "tanh"),
    "glow_stack": (lambda d, s: stack(glow_block, d, s), (2, 3, 3, 4), "nll"),
    "glow_unrolled": (lambda d, s: unrolled(glow_block, d, s), (2, 3, 3, 4), "nll"),
}


def problem(name, depth, seed):
    build, shape, kind = MODELS[name]
    graphdef, params = nnx.split(build(depth, seed))
    params = randomize(params, 100 + seed)
    x = data(shape, seed)

    def loss(params, x):
        model = nnx.merge(graphdef, params)
        if kind == "tanh":
            return jnp.sum(jnp.tanh(model(x)) ** 2)
        z, log_det = model.forward_and_log_det(x)  # a flow's negative log-likelihood
        return jnp.mean(0.5 * jnp.sum(z ** 2, axis=(1, 2, 3)) - log_det)

    return loss, params, x


@pytest.mark.parametrize("name", list(MODELS))
def test_mixed_sweep_over_lu_layers_has_no_lu(name):
    loss, params, x = problem(name, 2, 0)
    grad = moonjax.moonwalk_grad(loss, mode="mixed")
    counts = primitive_counts(jax.make_jaxpr(grad)(params, x).jaxpr)
    assert "lu" not in counts, counts
    assert counts.get("triangular_solve", 0) >= 2, counts  # the sweep solves with L and U


SLOW = pytest.mark.slow
CASES = [("dense_stack", 3, 0), ("dense_unrolled", 3, 2), ("conv_stack", 3, 1),
         pytest.param("dense_stack", 8, 1, marks=SLOW),
         pytest.param("dense_nnx_scan", 4, 3, marks=SLOW),
         pytest.param("conv_stack", 6, 4, marks=SLOW),
         pytest.param("glow_stack", 2, 0, marks=SLOW),
         pytest.param("glow_stack", 4, 2, marks=SLOW),
         pytest.param("glow_unrolled", 2, 1, marks=SLOW)]


@pytest.mark.parametrize(("name", "depth", "seed"), CASES)
def test_mixed_sweep_over_lu_layers_matches_jax_grad(name, depth, seed):
    loss, params, x = problem(name, depth, seed)
    got = jax.jit(moonjax.moonwalk_grad(loss, mode="mixed"))(params, x)
    expected = jax.jit(jax.grad(loss))(params, x)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)


def test_lax_scan_over_stacked_factors_has_no_lu_and_matches_jax_grad():
    depth, n = 5, 4
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(0.3 * rng.standard_normal((depth, n, n))),
              "b": jnp.asarray(0.3 * rng.standard_normal((depth, n, n))),
              "s": jnp.asarray(0.2 * rng.standard_normal((depth, n)))}
    perm = np.eye(n)[[2, 0, 3, 1]]

    def loss(params, x):
        def layer(h, p):  # W = P L U written by hand, used as W.T (the transposed chain)
            lower = jnp.tril(p["a"], -1) + jnp.eye(n)
            upper = jnp.triu(p["b"], 1) + jnp.eye(n) * jnp.exp(p["s"])
            return jax.nn.leaky_relu(h @ (perm @ lower @ upper).T, 0.3), None

        return jnp.sum(jnp.sin(lax.scan(layer, x, params)[0]))

    x = data((7, n), 1)
    grad = jax.jit(moonjax.moonwalk_grad(loss, mode="mixed"))
    assert "lu" not in primitive_counts(jax.make_jaxpr(grad)(params, x).jaxpr)
    got, expected = grad(params, x), jax.grad(loss)(params, x)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)


def test_free_weight_shared_by_layers_is_factorised_once_per_call():
    n = 5
    w = jnp.eye(n) + 0.3 * data((n, n), 0)
    biases = [0.1 * data((n,), k) for k in range(4)]

    def loss(w, biases, x):
        h = x
        for b in biases:  # four layers, one weight
            h = jax.nn.leaky_relu(h @ w + b, 0.5)
        return jnp.sum(h ** 2)

    x = data((6, n), 9)
    grad = jax.jit(moonjax.moonwalk_grad(loss, argnums=(0, 1), stream_argnums=2,
                                         mode="mixed"))
    assert primitive_counts(jax.make_jaxpr(grad)(w, biases, x).jaxpr).get("lu") == 1
    got, expected = grad(w, biases, x), jax.grad(loss, argnums=(0, 1))(w, biases, x)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-9, atol=1e-12)


def test_free_conv1x1_keeps_one_factorisation_per_layer():
    graphdef, params = nnx.split(stack(
        lambda r: nn.InvertibleConv1x1(4, rngs=r, lu=False, param_dtype=F64), 3, 0))
    params = randomize(params, 1)

    def loss(params, x):
        return jnp.sum(jnp.tanh(nnx.merge(graphdef, params)(x)))

    x = data((2, 3, 3, 4), 2)
    grad = moonjax.moonwalk_grad(loss, mode="mixed")  # (its gradients: tests/test_nn.py)
    assert primitive_counts(jax.make_jaxpr(grad)(params, x).jaxpr).get("lu") == 1  # in the loop


# --------------------------------------------------------------------------- the criterion

N = 4
PERM = np.eye(N)[[1, 3, 0, 2]]


def lower(a):
    return jnp.tril(a, -1) + jnp.eye(N)


def upper(b, s):
    return jnp.triu(b, 1) + jnp.eye(N) * jnp.exp(s)


# name: (W from (a, b, s), its factors' kinds (".T": the factor enters transposed), or None
# where the program does not build it from factors: solved by an LU)
WEIGHTS = {
    "p_l_u": (lambda a, b, s: PERM @ (lower(a) @ upper(b, s)), ["monomial", "lower", "upper"]),
    "l_u_transposed": (lambda a, b, s: (lower(a) @ upper(b, s)).T, ["upper.T", "lower.T"]),
    "u_t_times_p_t": (lambda a, b, s: upper(b, s).T @ PERM.T, ["lower", "monomial"]),
    "lower_times_lower": (lambda a, b, s: lower(a) @ lower(b), ["lower"]),
    "scaled_permutation": (lambda a, b, s: (2.0 * PERM) @ upper(b, s), ["monomial", "upper"]),
    "diagonal": (lambda a, b, s: jnp.eye(N) * jnp.exp(s), ["diagonal"]),
    "where_mask": (lambda a, b, s: jnp.where(jnp.arange(N)[:, None] >= jnp.arange(N), a,
                                             0.0) + 3 * jnp.eye(N), ["lower"]),
    "tril_minus_one_band": (lambda a, b, s: jnp.triu(a, -1) + 3 * jnp.eye(N), None),
    "free_times_upper": (lambda a, b, s: (jnp.eye(N) + a) @ upper(b, s), None),
    "free": (lambda a, b, s: jnp.eye(N) + a, None),
    "product_rounded_to_float32": (lambda a, b, s: (lower(a).astype(jnp.float32) @ upper(
        b, s).astype(jnp.float32)).astype(F64), None),  # L U to 7 digits: not W's factors
}


def weight_graph(make):
    a, b, s = 0.3 * data((N, N), 0), 0.3 * data((N, N), 1), 0.2 * data((N,), 2)
    closed = jax.make_jaxpr(make)(a, b, s)
    graph, consts = G.flatten(closed)
    values = list(consts) + [a, b, s]
    known = {id(v): np.asarray(c) for v, c in zip(graph.invars, consts)}

    def concrete(v):
        return np.asarray(v.val) if isinstance(v, G.Lit) else known.get(id(v))

    env = {id(v): x for v, x in zip(graph.invars, values)}
    for node in graph.nodes:
        ins = [a.val if isinstance(a, G.Lit) else env[id(a)] for a in node.inputs]
        env.update(zip(map(id, node.outputs), node.bind(*ins)))
    (out,) = graph.outvars
    return out, concrete, env


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_weight_factors_follow_from_the_program(name):
    make, kinds = WEIGHTS[name]
    out, concrete, env = weight_graph(make)
    chain = weight_factors(out, concrete)
    assert (None if chain is None else
            [f.kind + ".T" * f.transposed for f in chain]) == kinds
    w = env[id(out)].astype(F64)
    factors = None if chain is None else [
        (f, None if f.kind == "monomial" else
         (f.value.val if isinstance(f.value, G.Lit) else env[id(f.value)])) for f in chain]
    weight = Weight(w, factors)
    b = data((3, N), 5)
    for axes in ((0, 1), (1, 0)):
        m = jnp.transpose(w, axes)
        for transpose in (False, True):
            got = weight.solve(b, axes, transpose=transpose)
            expected = jnp.linalg.solve((m.T if transpose else m).T, b.T).T
            np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    if chain is None:
        assert len(weight.cache) == 2  # one LU per axes order, reused by both solves


def test_16_bit_weight_is_solved_as_computed():
    # the sweep solves in float32; the bfloat16 product P L U differs from L U there
    make = WEIGHTS["p_l_u"][0]
    out, concrete, _ = weight_graph(lambda a, b, s: make(a, b, s).astype(jnp.bfloat16))
    assert weight_factors(out, concrete) is None
    graphdef, params = nnx.split(nn.InvertibleDense(N, rngs=rngs(0), param_dtype=jnp.bfloat16))
    graph, consts = G.flatten(jax.make_jaxpr(lambda p: nnx.merge(graphdef, p).weight)(params))
    known = {id(v): np.asarray(c) for v, c in zip(graph.invars, consts)}
    (out,) = graph.outvars
    assert out.aval.dtype == jnp.bfloat16
    assert weight_factors(out, lambda v: known.get(id(v))) is None
