"""The default on the programs people write: layers as a Python loop, no ``lax.scan``.

A corpus of programs (plain JAX, Flax NNX and Linen, Equinox, Haiku; unrolled and
scanned; invertible and not), each built and initialised as its library does. For each:
the default's float64 gradient equals ``jax.grad``'s, its float32 XLA temp memory is at
most ``jax.grad``'s, and nothing raises. Unrolled invertible stacks keep a fraction of
``jax.grad``'s memory (reversible backprop over runs of unrolled segments).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from nets import assert_grads_close

import moonjax
from moonjax._src import graph as G
from moonjax._src import unrolled as U
from moonjax._src.sweep import stream_dependence

BATCH, WIDTH = 12, 10  # batch x width unlike any weight's shape (see _temp)


def _key(seed, i=0):
    return jax.random.fold_in(jax.random.PRNGKey(seed), i)


def _dense(key, n, m, scale=None):
    scale = np.sqrt(1.0 / n) if scale is None else scale  # lecun-normal: the usual default
    return jax.random.normal(key, (n, m)) * scale


def _labels(seed, n=10):
    return jax.random.randint(_key(seed, 99), (BATCH,), 0, n)


def _xent(logits, y):
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(y, 10), -1))


def _x(seed, width=WIDTH):
    return jax.random.normal(_key(seed, 98), (BATCH, width))


# -- plain JAX ---------------------------------------------------------------------


def mlp(act, widths, he=False):
    def build(seed):
        ws = [_dense(_key(seed, i), n, m, np.sqrt(2.0 / n) if he else None)
              for i, (n, m) in enumerate(zip(widths, widths[1:]))]

        def loss(ws, x, y):
            h = x
            for w in ws[:-1]:
                h = act(h @ w)
            return _xent(h @ ws[-1], y)

        return loss, (ws, _x(seed, widths[0]), _labels(seed)), {}
    return build


def _side(u, p):
    return jax.nn.gelu(u @ p["a"] + p["c"]) @ p["b"]


def _coupling_params(seed, depth, d=WIDTH, hidden=14):
    return [{"a": _dense(_key(seed, 2 * i), d // 2, hidden),
             "c": jnp.zeros(hidden),
             "b": _dense(_key(seed, 2 * i + 1), hidden, d // 2)} for i in range(depth)]


def additive(depth):
    def build(seed):
        def loss(ps, x):
            h = x
            for p in ps:
                u, v = jnp.split(h, 2, -1)
                h = jnp.concatenate([v + _side(u, p), u], -1)
            return jnp.mean(jnp.sin(h))
        return loss, (_coupling_params(seed, depth), _x(seed)), {}
    return build


def affine(depth):
    def build(seed):
        def loss(ps, x):
            h = x
            for p in ps:
                u, v = jnp.split(h, 2, -1)
                s = jnp.tanh(_side(u, p))
                h = jnp.concatenate([v * jnp.exp(s) + _side(u, p) * 0.5, u], -1)
            return jnp.mean(h ** 2)
        return loss, (_coupling_params(seed, depth), _x(seed)), {}
    return build


def revnet_pairs(depth):
    """RevNet written on the pair, no split or concatenate."""
    def build(seed):
        def loss(ps, x):
            x1, x2 = x[:, :WIDTH // 2], x[:, WIDTH // 2:]
            for p in ps:
                x1, x2 = x2 + _side(x1, p), x1
            return jnp.mean(jnp.cos(x1) * x2)
        return loss, (_coupling_params(seed, depth), _x(seed)), {}
    return build


def couplings_then_relu_head(seed):
    ps = _coupling_params(seed, 6)
    head = [_dense(_key(seed, 50), WIDTH, 16), _dense(_key(seed, 51), 16, 10)]

    def loss(params, x, y):
        ps, head = params
        h = x
        for i, p in enumerate(ps):
            u, v = jnp.split(h, 2, -1)
            h = jnp.concatenate([v + _side(u, p), u], -1)
            h = jnp.flip(h, -1) if i % 2 else h
        return _xent(jax.nn.relu(h @ head[0]) @ head[1], y)
    return loss, ((ps, head), _x(seed), _labels(seed)), {}


def residual_mlp(seed):
    ws = [_dense(_key(seed, i), WIDTH, WIDTH) for i in range(6)]

    def loss(ws, x):
        h = x
        for w in ws:
            h = h + jnp.tanh(h @ w)
        return jnp.mean(h ** 2)
    return loss, (ws, _x(seed)), {}


def closed_over_input(seed):
    x = _x(seed)
    base = mlp(jax.nn.relu, [WIDTH, 16, 10])(seed)[0]
    ws = [_dense(_key(seed, i), n, m) for i, (n, m) in enumerate([(WIDTH, 16), (16, 10)])]
    return (lambda ws, y: base(ws, x, y)), (ws, _labels(seed)), {}


def input_first(seed):
    base, (ws, x, y), _ = mlp(jax.nn.relu, [WIDTH, 16, 10])(seed)
    return (lambda x, ws, y: base(ws, x, y)), (x, ws, y), {"argnums": 1}


def trained_head_scale(seed):
    ws = [_dense(_key(seed, i), WIDTH, WIDTH) for i in range(4)]

    def loss(ws, scale, x):
        h = x
        for w in ws:
            h = jax.nn.leaky_relu(h @ w, 0.1)
        out = scale * jnp.mean(h ** 2)
        return out, {"h": h}
    return loss, (ws, jnp.asarray(1.3), _x(seed)), {"argnums": (0, 1), "has_aux": True}


def scan_reads_input_slices(seed):
    steps = 16
    w = _dense(_key(seed, 0), WIDTH, WIDTH)
    xs = jax.random.normal(_key(seed, 1), (steps, BATCH, WIDTH))

    def loss(w, xs):
        def step(h, x):
            return jnp.tanh(h @ w + x), None
        h, _ = lax.scan(step, jnp.zeros((BATCH, WIDTH)), xs)
        return jnp.mean(h ** 2)
    return loss, (w, xs), {}


def scanned_additive(seed):
    ps = _coupling_params(seed, 8)
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *ps)

    def loss(ps, x):
        def step(h, p):
            u, v = jnp.split(h, 2, -1)
            return jnp.concatenate([v + _side(u, p), u], -1), None
        return jnp.mean(jnp.sin(lax.scan(step, x, ps)[0]))
    return loss, (stacked, _x(seed)), {}


# -- libraries, built and initialised by their own constructors ----------------------


def nnx_couplings(seed, depth=6):
    nnx = pytest.importorskip("flax.nnx")

    class Coupling(nnx.Module):
        def __init__(self, rngs):
            self.f = nnx.Linear(WIDTH // 2, 14, rngs=rngs)
            self.g = nnx.Linear(14, WIDTH // 2, rngs=rngs)

        def __call__(self, h):
            u, v = jnp.split(h, 2, -1)
            return jnp.concatenate([v + self.g(jax.nn.gelu(self.f(u))), u], -1)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([Coupling(rngs) for _ in range(depth)])

        def __call__(self, h):
            for layer in self.layers:
                h = layer(h)
            return h

    graphdef, params = nnx.split(Net(nnx.Rngs(seed)), nnx.Param)

    def loss(params, x):
        return jnp.mean(jnp.sin(nnx.merge(graphdef, params)(x)))
    return loss, (params, _x(seed)), {}


def linen_affine(seed, depth=6):
    nn = pytest.importorskip("flax.linen")

    class Net(nn.Module):
        @nn.compact
        def __call__(self, h):
            for _ in range(depth):
                u, v = jnp.split(h, 2, -1)
                z = nn.tanh(nn.Dense(14)(u))
                s, t = jnp.split(nn.Dense(WIDTH)(z), 2, -1)
                h = jnp.concatenate([v * jnp.exp(jnp.tanh(s)) + t, u], -1)
            return h

    net = Net()
    params = net.init(_key(seed), _x(seed))

    def loss(params, x):
        return jnp.mean(net.apply(params, x) ** 2)
    return loss, (params, _x(seed)), {}


def equinox_couplings(seed, depth=6):
    eqx = pytest.importorskip("equinox")

    class Coupling(eqx.Module):
        mlp: eqx.nn.MLP

        def __init__(self, key):
            self.mlp = eqx.nn.MLP(WIDTH // 2, WIDTH // 2, 14, 1, activation=jnp.tanh,
                                  key=key)

        def __call__(self, h):
            u, v = jnp.split(h, 2, -1)
            return jnp.concatenate([v + jax.vmap(self.mlp)(u), u], -1)

    layers = [Coupling(_key(seed, i)) for i in range(depth)]
    params, static = eqx.partition(layers, eqx.is_inexact_array)

    def loss(params, x):
        h = x
        for layer in eqx.combine(params, static):
            h = layer(h)
        return jnp.mean(jnp.sin(h))
    return loss, (params, _x(seed)), {}


def haiku_mlp(seed):
    hk = pytest.importorskip("haiku")

    def forward(x):
        return hk.nets.MLP([16, 16, 10])(x)

    net = hk.without_apply_rng(hk.transform(forward))
    params = net.init(_key(seed), _x(seed))

    def loss(params, x, y):
        return _xent(net.apply(params, x), y)
    return loss, (params, _x(seed), _labels(seed)), {}


def haiku_couplings(seed, depth=6):
    hk = pytest.importorskip("haiku")

    def forward(h):
        for _ in range(depth):
            u, v = jnp.split(h, 2, -1)
            h = jnp.concatenate([v + hk.nets.MLP([14, WIDTH // 2])(u), u], -1)
        return h

    net = hk.without_apply_rng(hk.transform(forward))
    params = net.init(_key(seed), _x(seed))

    def loss(params, x):
        return jnp.mean(jnp.sin(net.apply(params, x)))
    return loss, (params, _x(seed)), {}


CORPUS = {
    "relu_mlp": mlp(jax.nn.relu, [WIDTH, 32, 16, 10]),
    "relu_mlp_he_init": mlp(jax.nn.relu, [WIDTH, 16, 16, 10], he=True),
    "leaky_funnel": mlp(lambda h: jax.nn.leaky_relu(h, 0.1), [WIDTH + 6, 15, 14, 13, 12, 11, 10]),
    "gelu_mlp": mlp(jax.nn.gelu, [WIDTH, 16, 16, 10]),
    "leaky_square_mlp": mlp(lambda h: jax.nn.leaky_relu(h, 0.05), [WIDTH] * 6 + [10]),
    "additive_unrolled": additive(8),
    "affine_unrolled": affine(8),
    "revnet_pairs": revnet_pairs(8),
    "couplings_then_relu_head": couplings_then_relu_head,
    "residual_mlp": residual_mlp,
    "closed_over_input": closed_over_input,
    "input_argument_first": input_first,
    "trained_head_scale_aux": trained_head_scale,
    "scan_reads_input_slices": scan_reads_input_slices,
    "scanned_additive": scanned_additive,
    "nnx_list_couplings": nnx_couplings,
    "linen_compact_affine": linen_affine,
    "equinox_couplings": equinox_couplings,
    "haiku_mlp": haiku_mlp,
    "haiku_couplings": haiku_couplings,
}


def _cast(tree, dtype):
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if jnp.issubdtype(jnp.result_type(a), jnp.floating)
        else a, tree)


def _grad_fns(loss, opts):
    argnums, has_aux = opts.get("argnums", 0), opts.get("has_aux", False)
    return (moonjax.moonwalk_grad(loss, argnums=argnums, has_aux=has_aux),
            jax.grad(loss, argnums=argnums, has_aux=has_aux))


def _temp(fn, args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_default_equals_jax_grad_in_float64(name, seed, x64):
    loss, args, opts = CORPUS[name](seed)
    args = _cast(args, jnp.float64)
    mine, ref = _grad_fns(loss, opts)
    got, want = jax.jit(mine)(*args), ref(*args)
    assert_grads_close(got, want, rtol=1e-9)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_default_keeps_no_more_than_jax_grad(name, x32):
    loss, args, opts = CORPUS[name](0)
    args = _cast(args, jnp.float32)
    mine, ref = _grad_fns(loss, opts)
    assert _temp(mine, args) <= _temp(ref, args)


def _unrolled_stack(kind, depth, width=16, batch=40):
    ps = _coupling_params(0, depth, width, hidden=24)
    x = jax.random.normal(_key(0, 7), (batch, width))
    return (additive if kind == "additive" else affine)(depth)(0)[0], ps, x


@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_unrolled_invertible_stack_of_32_layers_keeps_a_quarter(kind, x32):
    loss, ps, x = _unrolled_stack(kind, 32)
    mine = _temp(moonjax.moonwalk_grad(loss), (ps, x))
    ref = _temp(jax.grad(loss), (ps, x))
    assert mine <= 0.25 * ref, (mine, ref)
    report = moonjax.check(loss, ps, x)
    assert report.treatment == "reversible", report.plan
    assert re.search(r"(32|64) unrolled segments", report.plan), report.plan


@pytest.mark.parametrize("name", ["relu_mlp", "gelu_mlp", "leaky_funnel", "residual_mlp"])
def test_plan_is_reverse_mode_where_nothing_inverts(name):
    loss, args, opts = CORPUS[name](0)
    report = moonjax.check(loss, *args, **opts)
    assert report.ok and report.treatment == "reverse", report.plan
    assert "reverse mode keeps least" in report.plan


def test_segments_cut_a_coupling_stack_at_its_layers():
    loss, ps, x = _unrolled_stack("additive", 12)
    graph, consts = G.flatten(jax.make_jaxpr(loss)(ps, x))
    n = len(graph.invars)
    dep = stream_dependence(graph, [i == n - 1 for i in range(n)])
    segs = U.segments(graph, dep)
    layers = [s for s in segs if any(m.primitive.name == "dot_general" for m in s.nodes)]
    assert len(layers) == 12 and all(s.invertible for s in layers)
    (run,) = U.runs(graph, dep, "auto")
    assert len(run.segments) == 12 and run.anchor_every >= 2


def _drifting_affine(depth=24, scale=3.0):
    """Affine couplings whose scales are large: inverting them loses digits (the
    rebuilt input drifts 3e-3 unanchored in float32)."""
    ps = _coupling_params(3, depth, WIDTH)
    ps = [dict(p, b=p["b"] * scale) for p in ps]

    def loss(ps, x):
        h = x
        for p in ps:
            u, v = jnp.split(h, 2, -1)
            h = jnp.concatenate([v * jnp.exp(2.0 * jnp.tanh(_side(u, p))), u], -1)
        return jnp.mean(jnp.tanh(h))
    return loss, ps, _x(3)


def _rel_err(got, want):
    flat = lambda t: np.concatenate([np.ravel(np.asarray(a, np.float64))
                                     for a in jax.tree_util.tree_leaves(t)])
    return np.linalg.norm(flat(got) - flat(want)) / np.linalg.norm(flat(want))


def test_default_does_not_refuse_a_drifting_run(x32):
    """Forced reversible backprop refuses a run whose rebuilt input drifted (3e-3);
    the default recomputes it exactly and returns jax.grad's gradient."""
    loss, ps, x = _drifting_affine()
    forced = moonjax.moonwalk_grad(loss, mode="reversible", anchor_every=None)
    with pytest.raises(moonjax.DriftError, match=re.escape("unrolled layer")):
        forced(ps, x)
    got = jax.jit(moonjax.moonwalk_grad(loss, anchor_every=24))(ps, x)  # one block
    assert _rel_err(got, jax.jit(jax.grad(loss))(ps, x)) <= 1e-5


@pytest.mark.parametrize("kind", ["additive", "affine"])
def test_exact_recompute_of_a_block_equals_jax_grad(kind, monkeypatch):
    """The fallback itself (every block recomputed, as if each had drifted)."""
    monkeypatch.setattr(U, "recompute_tolerance", lambda dtype: -1.0)
    loss, ps, x = _unrolled_stack(kind, 9)
    got = moonjax.moonwalk_grad(loss, anchor_every=4)(ps, x)
    assert_grads_close(got, jax.grad(loss)(ps, x), rtol=1e-9)


def test_unrolled_run_under_vmap_with_aux_and_the_input_gradient(x64):
    loss, ps, x = _unrolled_stack("additive", 12, width=WIDTH, batch=6)

    def with_aux(ps, x):
        value = loss(ps, x)
        return value, {"value": value}

    mine = moonjax.moonwalk_grad(with_aux, argnums=(0, 1), has_aux=True)
    ref = jax.grad(with_aux, argnums=(0, 1), has_aux=True)
    assert moonjax.check(loss, ps, x).treatment == "reversible"
    (got, aux), (want, want_aux) = jax.jit(mine)(ps, x), ref(ps, x)
    assert_grads_close(got, want, rtol=1e-9)
    assert float(aux["value"]) == pytest.approx(float(want_aux["value"]))
    per_example = jax.vmap(moonjax.moonwalk_grad(loss), (None, 0))(ps, x[:, None])
    assert_grads_close(per_example, jax.vmap(jax.grad(loss), (None, 0))(ps, x[:, None]),
                       rtol=1e-9)


@pytest.mark.parametrize("mode", ["mixed", "forward", "reversible"])
def test_a_loop_reading_the_input_through_xs_is_exact_in_every_mode(mode, x64):
    # the sweep cannot enter it: phase 1 records the whole loop's output cotangent
    loss, args, _ = scan_reads_input_slices(0)
    args = _cast(args, jnp.float64)
    assert_grads_close(moonjax.moonwalk_grad(loss, mode=mode)(*args), jax.grad(loss)(*args),
                       rtol=1e-9)
    assert moonjax.check(loss, *args, mode=mode).ok
