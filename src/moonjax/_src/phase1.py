"""Phase 1: the exact cotangent ``g₀`` of the stream, three ways.

* ``mixed``: a reverse pass for the input cotangent only (see ``api``): parameters are
  constants, so it stores what the input vjp needs (weights, sign masks), not the
  activations the parameter gradients would need.
* ``reversible`` (no sweep follows): reverse mode for every cotangent, but every
  ``lax.scan`` over layers keeps only its final carry; going back, each layer's input
  is rebuilt from its output by inverting the layer (``moonjax._src.inverse``) and
  the layer's vjp gives its parameter cotangents on the spot. Memory is flat in depth.
* ``forward``: forward-mode JVPs, one per entry of the input, one at a time. Nothing is
  stored; time grows with the size of the input. With independent examples
  (``batch_axis=0``), one JVP per feature moves every example at once, and the loss
  head (where examples meet) is differentiated in reverse mode.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moonjax._src import drift as D
from moonjax._src import graph as G
from moonjax._src import masks
from moonjax._src.errors import BATCH_MIXED, ArgumentError, where
from moonjax._src.inverse import Inversion, invert, plan_inversion
from moonjax._src.sweep import is_float, stream_dependence
from moonjax._src.unrolled import recompute_tolerance, reversible_run
from moonjax._src.unrolled import runs as unrolled_runs


def evaluate(graph: G.Graph, invals, bind=None, runs=(), recompute=False):
    """Evaluate ``graph``; ``bind(node, args)`` may replace a node's evaluation, and
    each of ``runs`` (``Run``) is evaluated as one call of
    ``reversible_run`` where its last equation stands (every
    value it reads is computed by then; nothing outside it reads its inner values)."""
    env = {id(v): x for v, x in zip(graph.invars, invals)}
    read = lambda a: a.val if isinstance(a, G.Lit) else env[id(a)]
    inside = {id(n): r for r in runs for n in r.nodes}
    for node in graph.nodes:
        run = inside.get(id(node))
        if run is not None:
            if node is run.nodes[-1]:
                outs = reversible_run(run, recompute)([read(v) for v in run.ins],
                                                      [read(v) for v in run.externals])
                env.update(zip(map(id, run.outs), outs))
            continue
        args = [read(a) for a in node.inputs]
        outs = bind(node, args) if bind is not None else None
        if outs is None:
            outs = node.bind(*args)
        env.update(zip(map(id, node.outputs), outs))
    return [read(o) for o in graph.outvars]


def reversible(graph, invals, stream_pos, diff_pos, anchor_every="auto", checkpointed=None,
               fallback=False, unrolled=True, recompute=False, runs=None):
    """Reversible backprop derived from the program: ``(outvals, cotangents of
    diff_pos)``. Every ``lax.scan`` over the stream keeps only its final carry; going
    back, each step's input is rebuilt from its output by inverting the body
    (``moonjax._src.inverse``) and one vjp of the step gives the input and the
    parameter cotangents at once. With ``unrolled``, every run of unrolled layers that
    inverts (``moonjax._src.unrolled.runs``) is run the same way, one segment at a
    time (``runs``: those the plan found, else found here). The rest of the program is
    plain reverse mode.

    ``anchor_every``: ``k`` stores the carry every ``k`` steps and restarts the
    inversion there; ``"auto"`` as ``reversible_anchor`` says (none for additions
    and moves); ``None`` never.

    ``checkpointed``: ``node.index -> k`` for the loops run as checkpointed reverse
    mode instead (``_checkpointed_scan``); with ``fallback``, also every loop over
    the stream that cannot be inverted (``fallback_interval``)."""
    stream = [i in stream_pos for i in range(len(invals))]
    dep = stream_dependence(graph, stream)
    loops = {node.index: body for node, body in reversible_loops(graph, dep)}
    checkpointed = dict(checkpointed or {})
    if fallback:
        for node in graph.nodes:
            if node.primitive is lax.scan_p and any(
                    isinstance(a, G.Value) and id(a) in dep for a in node.inputs):
                k = fallback_interval(node, loops.get(node.index))
                if k is not None:
                    checkpointed.setdefault(node.index, k)

    if runs is None:
        runs = unrolled_runs(graph, dep, anchor_every) if unrolled else ()

    def bind(node, args):
        if node.index in checkpointed:
            return _checkpointed_scan(node, checkpointed[node.index])(args)
        loop = loops.get(node.index)
        return None if loop is None else _reversible_scan(node, loop, anchor_every,
                                                          recompute)(args)

    def f(*diff_vals):
        vals = list(invals)
        for i, s in zip(diff_pos, diff_vals):
            vals[i] = s
        outs = evaluate(graph, vals, bind, runs, recompute)
        return outs[0], outs[1:]

    loss, pullback, aux = jax.vjp(f, *[invals[i] for i in diff_pos], has_aux=True)
    return [loss, *aux], list(pullback(jnp.ones_like(loss)))


def reversible_loops(graph: G.Graph, dep: set) -> list:
    """``[(scan node, LoopBody)]`` for the top-level loops that carry the stream
    (``dep``: the ids of stream-dependent values) and read it through their carry
    only: the loops reversible backprop runs by inversion. The inversion may be stuck
    (``Inversion.stuck``: the body has no inverse)."""
    found = []
    for node in graph.nodes:
        if node.primitive is not lax.scan_p:
            continue
        p = node.params
        nc, ncar = p["num_consts"], p["num_carry"]
        ins = node.inputs
        is_dep = lambda a: isinstance(a, G.Value) and id(a) in dep
        if any(is_dep(a) for a in ins[:nc]) or any(is_dep(a) for a in ins[nc + ncar:]):
            continue  # the loop reads the stream outside its carry: plain reverse mode
        if not any(is_dep(a) for a in ins[nc:nc + ncar]):
            continue
        found.append((node, LoopBody.of(node)))
    return found


@dataclasses.dataclass(frozen=True)
class LoopBody:
    """A ``scan`` body flattened, and how its carry input is rebuilt from its carry
    outputs, its consts and its ``xs`` (static)."""

    graph: G.Graph
    consts: list
    inversion: Inversion
    half: bool = False  # a 16-bit float in the carry

    @classmethod
    def of(cls, node) -> LoopBody:
        p = node.params
        nc, ncar = p["num_consts"], p["num_carry"]
        body, body_consts = G.flatten(p["jaxpr"])
        n_lead = len(body_consts)
        known = list(body.invars[:n_lead + nc]) + list(body.invars[n_lead + nc + ncar:])
        known += [o for o in body.outvars[:ncar] if isinstance(o, G.Value)]
        carry = list(body.invars[n_lead + nc:n_lead + nc + ncar])
        half = any(is_float(v.aval) and v.aval.dtype.itemsize < 4 for v in carry)
        return cls(body, body_consts, plan_inversion(body, {id(v) for v in known}, carry),
                   half)


def _float0_like(x):
    return np.zeros(np.shape(x), jax.dtypes.float0)


def _ct_zero(x):
    return jnp.zeros_like(x) if is_float(jax.typeof(x)) else _float0_like(x)


def step_function(body: G.Graph, body_consts, ncar: int):
    """One step of a flattened scan body: ``(consts, carry, x) -> (carry, y)``."""
    def step(consts, carry, x):
        outs = evaluate(body, [*body_consts, *consts, *carry, *x])
        return list(outs[:ncar]), list(outs[ncar:])
    return step


def reversible_anchor(loop: LoopBody, anchor_every, length: int) -> int | None:
    """How often reversible backprop stores a loop's carry: every ``anchor_every``
    steps (an int, or ``None``: never), the last block shorter where it does not divide
    ``length``. For ``"auto"``: every ``REVERSIBLE_ANCHOR`` steps, or ``sqrt(length)``
    for longer loops (the stored carries and one block's, which the default's exact
    recompute holds, weigh about the same), where the inverse adds and moves only or
    divides elementwise by values the step computes (an affine coupling's scale); every
    ``AUTO_ANCHOR`` where it solves or takes Newton steps, and every ``AUTO_ANCHOR`` at
    most for a 16-bit carry."""
    if anchor_every == "auto":
        anchor_every = (max(REVERSIBLE_ANCHOR, round(math.sqrt(length)))
                        if loop.inversion.divides_only else AUTO_ANCHOR)
        if loop.half:
            anchor_every = min(anchor_every, AUTO_ANCHOR)
    if anchor_every is None or anchor_every >= length:
        return None
    return anchor_every


def _reversible_scan(node, loop: LoopBody, anchor_every, recompute: bool = False):
    """The loop as a ``custom_vjp`` whose backward pass inverts it step by step, as a
    function of the node's inputs. Anchored every ``k`` steps
    (``reversible_anchor``), the forward pass also stores the carry at the start of
    every later block of ``k`` steps (the first starts at the loop's input; the last
    may be shorter), and going back each block restarts from its stored carry:
    rounding grows over ``k`` steps at most. Where each block starts, the rebuilt
    carry is measured against the stored one (the self-check). With ``recompute`` (the
    default's choice), a loop whose rebuilt carry drifted beyond
    :func:`~moonjax._src.unrolled.recompute_tolerance` is differentiated again exactly,
    as reverse mode over the blocks from their stored carries (:func:`_blocks_backward`,
    under a ``lax.cond``: only the calls that need it pay), and nothing is reported;
    without, the drift is reported for the guard to refuse."""
    p = node.params
    nc, ncar, length, rev = p["num_consts"], p["num_carry"], p["length"], p["reverse"]
    body, body_consts, inversion = loop.graph, loop.consts, loop.inversion
    n_lead = len(body_consts)
    carry_vars = body.invars[n_lead + nc:n_lead + nc + ncar]
    xs_vars = body.invars[n_lead + nc + ncar:]
    k = reversible_anchor(loop, anchor_every, length)
    if inversion.stuck is not None:
        invert(body, {}, carry_vars, inversion)  # raises, naming the stuck equation
    k = length if k is None else k
    nb = -(-length // k)  # blocks; each but the first starts at a stored carry
    meeting = D.Meeting("the loop's input" if nb == 1 else f"the carry stored every {k} "
                        "steps", where(node.source_info),
                        measured="the input rebuilt by inverting every step")

    step_fn = step_function(body, body_consts, ncar)
    run = _bound(node)

    def fwd(consts, init, xs):
        if nb == 1:  # the loop's input is the only anchor
            carry, ys = run(consts, init, xs)
            return (carry, ys), (consts, init, xs, carry, None)

        def step(state, x):  # p: the step's position in the loop's order
            carry, starts, p = state
            at, b = (p % k == 0) & (p > 0), jnp.maximum(p // k - 1, 0)
            starts = [lax.dynamic_update_index_in_dim(s, jnp.where(
                at, c, lax.dynamic_index_in_dim(s, b, keepdims=False)), b, 0)
                for s, c in zip(starts, carry)]
            carry, y = step_fn(consts, carry, x)
            return (carry, starts, p + 1), y

        starts0 = [jnp.zeros((nb - 1, *jnp.shape(c)), jnp.result_type(c)) for c in init]
        (carry, starts, _), ys = lax.scan(step, (list(init), starts0, 0), list(xs),
                                          length=length, reverse=rev)
        return (carry, ys), (consts, init, xs, carry, starts)

    def bwd(res, cts):
        consts, init, xs, final, starts = res
        g_carry, g_ys = cts
        fc = [i for i, c in enumerate(consts) if is_float(jax.typeof(c))]
        fx = [i for i, x in enumerate(xs) if is_float(jax.typeof(x))]
        floats = [i for i, c in enumerate(init) if is_float(jax.typeof(c))]
        known_in = {id(v): x for v, x in zip(body.invars[:n_lead + nc],
                                             [*body_consts, *consts])}
        floors = {i: D.norm(final[i]) for i in floats}  # outside: no copy of the carry

        def step(state, inp):
            carry_out, g, g_consts, drift, n = state
            x, g_y = inp
            p = length - 1 - n  # the step's position in the loop's order
            known = dict(known_in)
            known.update(zip(map(id, xs_vars), x))
            for o, c in zip(body.outvars[:ncar], carry_out):
                if isinstance(o, G.Value):
                    known.setdefault(id(o), c)
            rebuilt = invert(body, known, carry_vars, inversion)
            # at a block's start the exact carry is known: measure the drift of the
            # rebuilt one (the self-check) and go on from the exact one
            at_start = p % k == 0
            exact = list(init) if starts is None else [
                jnp.where(p < k, i, lax.dynamic_index_in_dim(
                    s, jnp.maximum(p // k - 1, 0), keepdims=False))
                for i, s in zip(init, starts)]
            drift = lax.cond(at_start, lambda: jnp.maximum(drift, _most([
                D.relative(rebuilt[i], exact[i], floor=floors[i]) for i in floats])),
                lambda: drift)
            carry_in = rebuilt if starts is None else [
                jnp.where(at_start, e, r) for e, r in zip(exact, rebuilt)]

            def step_vjp(cf, c, xf):
                return step_fn(_put(consts, fc, cf), c, _put(x, fx, xf))

            _, vjp = jax.vjp(step_vjp, [consts[i] for i in fc], carry_in, [x[i] for i in fx])
            gc, g_in, gx = vjp((g, g_y))
            return (carry_in, g_in, [a + b for a, b in zip(g_consts, gc)], drift, n + 1), gx

        g0 = [jnp.zeros_like(consts[i]) for i in fc]
        (_, g_init, g_consts, drift, _), g_xs = lax.scan(
            step, (list(final), list(g_carry), g0, _most([]), 0), (list(xs), list(g_ys)),
            length=length, reverse=not rev)
        if recompute and floats:
            tol = min(recompute_tolerance(jnp.result_type(init[i])) for i in floats)
            stored = ([i[None] for i in init] if starts is None else
                      [jnp.concatenate([i[None], s]) for i, s in zip(init, starts)])

            def exact(swept):
                del swept  # replaced: its buffers are the result's (no copy of them)
                gi, gc, gx = _blocks_backward(step_fn, k, length, rev, consts, xs, stored,
                                              g_carry, g_ys)
                return [gi[i] for i in floats], gc, gx

            swept = ([g_init[i] for i in floats], g_consts, g_xs)
            # a non-finite drift (NaN compares false) is a drift too
            g_floats, g_consts, g_xs = lax.cond(~(drift <= tol), exact, lambda s: s, swept)
            g_init = _put(g_init, floats, g_floats)
        else:
            D.note_value(meeting, drift)
            if inversion.amplifier is not None:
                D.amplifier(inversion.amplifier.describe())
        return _spread(consts, fc, g_consts), g_init, _spread(xs, fx, g_xs)

    run.defvjp(fwd, bwd)
    return _of_inputs(run, nc, ncar)


def fallback_interval(node, loop: LoopBody | None) -> int | None:
    """The blocks of checkpointed reverse mode that forced reversible backprop runs a
    loop over the stream in when it cannot invert it (no inverse rule, or the stream
    read outside the carry: ``loop`` is ``None``); ``None`` for a loop it inverts."""
    if loop is not None and loop.inversion.stuck is None:
        return None
    return checkpoint_interval(node.params["length"])


def checkpoint_interval(length: int) -> int:
    """Steps per block of a checkpointed loop: about ``sqrt(length)``, so that the
    carries stored at the blocks' starts and one block's step inputs, rebuilt while it
    is differentiated, weigh about the same."""
    return max(1, min(length, round(math.sqrt(length))))


def _checkpointed_scan(node, k: int):
    """The loop as reverse mode over blocks of ``k`` steps, as a function of the
    node's inputs: the forward pass keeps the carry at every block's start; going
    back, each block is run forwards once more from it, keeping its ``k`` step inputs,
    and each step's vjp gives the input, consts and ``xs`` cotangents
    (:func:`_blocks_backward`). Exact (reverse mode) for any body; each step runs
    forwards twice more (the block's rebuild and inside its vjp). The last block may
    be shorter: ``xs`` and ``ys`` are read and written in place by step index, never
    sliced (a slice would copy the weights)."""
    p = node.params
    nc, ncar, length, rev = p["num_consts"], p["num_carry"], p["length"], p["reverse"]
    body, body_consts = G.flatten(p["jaxpr"])
    nb = -(-length // k)
    index = (lambda t: length - 1 - t) if rev else (lambda t: t)  # the t-th step's row

    step_fn = step_function(body, body_consts, ncar)
    run = _bound(node)

    def fwd(consts, init, xs):
        y_avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)
                   for v in body.outvars[ncar:]]
        ys0 = [jnp.zeros((length, *a.shape), a.dtype) for a in y_avals]

        def block(state, b):
            def one(j, st):
                def do(st):
                    carry, ys = st
                    i = index(b * k + j)
                    carry, y = step_fn(consts, carry, _row(xs, i))
                    return carry, _put_row(ys, y, i)
                return _in_loop(b * k + j, length, do, st)

            return lax.fori_loop(0, k, one, state), state[0]

        (carry, ys), starts = lax.scan(block, (list(init), ys0), jnp.arange(nb))
        return (carry, ys), (consts, xs, starts)

    def bwd(res, cts):
        consts, xs, starts = res
        fc = [i for i, c in enumerate(consts) if is_float(jax.typeof(c))]
        fx = [i for i, x in enumerate(xs) if is_float(jax.typeof(x))]
        g_init, g_consts, g_xs = _blocks_backward(step_fn, k, length, rev, consts, xs,
                                                  starts, *cts)
        return _spread(consts, fc, g_consts), g_init, _spread(xs, fx, g_xs)

    run.defvjp(fwd, bwd)
    return _of_inputs(run, nc, ncar)


def _bound(node):
    """The scan ``node`` as a ``custom_vjp`` function ``(consts, init, xs) -> (carry,
    ys)`` whose rules the caller defines."""
    ncar = node.params["num_carry"]

    @jax.custom_vjp
    def run(consts, init, xs):
        outs = node.bind(*consts, *init, *xs)
        return list(outs[:ncar]), list(outs[ncar:])

    return run


def _row(arrays, i):
    return [lax.dynamic_index_in_dim(a, i, keepdims=False) for a in arrays]


def _put_row(arrays, values, i):
    return [lax.dynamic_update_index_in_dim(a, v, i, 0) for a, v in zip(arrays, values)]


def _in_loop(t, length, fn, state):
    """``fn(state)`` for a step of the loop; the steps past the end of its last block
    do nothing."""
    return lax.cond(t < length, fn, lambda s: s, state)


def _blocks_backward(step_fn, k, length, rev, consts, xs, starts, g_carry, g_ys):
    """Reverse mode over blocks of ``k`` steps of a loop whose carry at each block's
    start is ``starts`` (stacked over the blocks): each block run forwards once more
    from its start for its step inputs, then each step's vjp. Returns the cotangents
    ``(init, float consts, float xs)``."""
    nb = -(-length // k)
    index = (lambda t: length - 1 - t) if rev else (lambda t: t)
    fc = [i for i, c in enumerate(consts) if is_float(jax.typeof(c))]
    fx = [i for i, x in enumerate(xs) if is_float(jax.typeof(x))]

    def block(state, b):
        start = [s[b] for s in starts]
        inputs0 = [jnp.zeros((k, *c.shape), c.dtype) for c in start]

        def rebuild(j, st):  # the block's step inputs, from its stored start
            carry, inputs = st
            inputs = _put_row(inputs, carry, j)
            carry = _in_loop(b * k + j, length, lambda c: step_fn(consts, c, _row(
                xs, index(b * k + j)))[0], carry)
            return carry, inputs

        _, inputs = lax.fori_loop(0, k, rebuild, (start, inputs0))

        def back(jj, st):
            j = k - 1 - jj

            def do(st):
                g, g_consts, g_xs = st
                i = index(b * k + j)
                x = _row(xs, i)

                def step_vjp(cf, c, xf):
                    return step_fn(_put(consts, fc, cf), c, _put(x, fx, xf))

                _, vjp = jax.vjp(step_vjp, [consts[n] for n in fc], _row(inputs, j),
                                 [x[n] for n in fx])
                gc, g_in, gx = vjp((g, _row(g_ys, i)))
                return (g_in, [a + c for a, c in zip(g_consts, gc)],
                        _put_row(g_xs, gx, i))
            return _in_loop(b * k + j, length, do, st)

        return lax.fori_loop(0, k, back, state), None

    state = (list(g_carry), [jnp.zeros_like(consts[n]) for n in fc],
             [jnp.zeros_like(xs[n]) for n in fx])
    (g_init, g_consts, g_xs), _ = lax.scan(block, state, jnp.arange(nb), reverse=True)
    return g_init, g_consts, g_xs


def _spread(vals, positions, cts):
    """Cotangents of ``vals``: ``cts`` at the float ``positions``, zeros elsewhere."""
    out = [_ct_zero(v) for v in vals]
    for i, c in zip(positions, cts):
        out[i] = c
    return out


def _of_inputs(run, nc: int, ncar: int):
    """``run(consts, init, xs)`` as a function of a scan node's inputs, flat outputs."""
    return lambda args: _flat(run(list(args[:nc]), list(args[nc:nc + ncar]),
                                  list(args[nc + ncar:])))


def _most(drifts):
    """The largest of the drifts (a zero of the drift's dtype for none)."""
    zero = jnp.zeros((), jnp.promote_types(jnp.float32, jnp.result_type(float)))
    return jnp.max(jnp.stack([zero, *[d.astype(zero.dtype) for d in drifts]]))


def _put(vals, positions, new):
    out = list(vals)
    for i, v in zip(positions, new):
        out[i] = v
    return out


def _flat(pair):
    carry, ys = pair
    return [*carry, *ys]


def forward(graph, invals, stream_pos, collected=None):
    """``(outvals, g_stream, recorded)`` by one JVP per entry of the stream and of the
    fragments ``collected`` (the spine steps the sweep cannot cross, as
    ``mixed_with_probes`` takes them): no residuals at all. A zero is added at
    each fragment and its cotangent, the record, comes from the JVPs as the stream's
    does (``recorded`` is ``None`` without fragments)."""
    probes = _probes(graph, collected) if collected else {}

    def f(stream_vals, probe_vals):
        vals = list(invals)
        for i, s in zip(stream_pos, stream_vals):
            vals[i] = s
        return _evaluate_probed(graph, vals, probe_vals, packed=False)

    primals = ([invals[i] for i in stream_pos], probes)
    outs = f(*primals)
    leaves, tree = jax.tree_util.tree_flatten(primals)
    grads = []
    for k, leaf in enumerate(leaves):
        size = math.prod(np.shape(leaf))

        def directional(j, k=k, leaf=leaf, size=size):
            tangents = [jnp.zeros_like(t) for t in leaves]
            tangents[k] = jax.nn.one_hot(j, size, dtype=jnp.result_type(leaf)).reshape(
                np.shape(leaf))
            return jax.jvp(lambda *v: f(*jax.tree_util.tree_unflatten(tree, v))[0],
                           leaves, tangents)[1]

        grads.append(lax.map(directional, jnp.arange(size)).reshape(np.shape(leaf)))
    g_stream, recorded = jax.tree_util.tree_unflatten(tree, grads)
    return outs, g_stream, recorded if collected else None


def forward_batched(graph, invals, stream_pos, debug=False):
    """``forward`` for independent examples along axis 0 of every stream input.

    The *cut* is where the batch ends: the stream-dependent values with the batch as
    their leading axis that feed an operation whose result is no longer per example
    (the loss's mean, a contraction over the batch). Up to the cut, example ``b``'s
    values depend on example ``b``'s input only, so one JVP with feature ``j`` of every
    example moved at once gives ``∂cut[b]/∂x[b, j]`` for all ``b``; the cut's cotangent
    comes from reverse mode over the head alone, and ``g[b, j]`` is their inner product.
    Probe JVPs that move part of the batch check the claim: if a cut value of an example
    that did not move changes, the gradient is NaN (``debug=True``: an error).
    """
    stream_vals = [invals[i] for i in stream_pos]
    sizes = {np.shape(s)[0] if np.ndim(s) else None for s in stream_vals}
    if len(sizes) != 1 or None in sizes:
        raise ArgumentError(
            "batch_axis=0 needs every network input to have the same leading batch "
            f"size; got shapes {[tuple(np.shape(s)) for s in stream_vals]}")
    (batch,) = sizes
    dep = stream_dependence(graph, [i in stream_pos for i in range(len(invals))])
    per_example = lambda v: (isinstance(v, G.Value) and id(v) in dep
                             and tuple(v.aval.shape[:1]) == (batch,))
    cut, seen, meets, region = [], set(), [], set()
    for node in graph.nodes:
        ins = [a for a in node.inputs if isinstance(a, G.Value) and id(a) in dep]
        if not ins:
            continue
        if all(map(per_example, ins)) and all(map(per_example, node.outputs)):
            region.add(id(node))  # still per example
            continue
        meets.append(node)
        for a in ins:
            if per_example(a) and id(a) not in seen:
                cut.append(a)
                seen.add(id(a))

    def run(*stream_in, cut_in=None):
        vals = list(invals)
        for i, s in zip(stream_pos, stream_in):
            vals[i] = s
        env = {}

        def bind(node, args):
            if cut_in is not None and id(node) in region:
                # the head's view: the cut values come from outside, and the rest of the
                # per-example region feeds only the region, so it is not evaluated again
                outs = [cut_in.get(id(o)) for o in node.outputs]
            else:
                outs = node.bind(*args)
                if cut_in is not None:
                    outs = [cut_in.get(id(o), x) for o, x in zip(node.outputs, outs)]
            env.update((id(o), x) for o, x in zip(node.outputs, outs))
            return outs

        if cut_in is not None:
            vals = [cut_in.get(id(v), x) for v, x in zip(graph.invars, vals)]
        env.update((id(v), x) for v, x in zip(graph.invars, vals))
        outs = evaluate(graph, vals, bind)
        return outs, [env[id(c)] for c in cut]

    outs, cut_vals = run(*stream_vals)
    if not cut:
        return outs, [jnp.zeros_like(s) for s in stream_vals]
    _, head_pullback = jax.vjp(
        lambda *cv: run(*stream_vals, cut_in=dict(zip(map(id, cut), cv)))[0][0], *cut_vals)
    cut_cts = head_pullback(jnp.ones_like(outs[0]))

    def cut_tangents(tangents):
        return jax.jvp(lambda *v: run(*v)[1], stream_vals, tangents)[1]

    def per_example_dot(ts):
        return sum(jnp.sum((c * t).reshape(batch, -1), -1) for c, t in zip(cut_cts, ts)
                   if c is not None and jnp.issubdtype(c.dtype, jnp.inexact))

    # the probes: move the examples whose index has bit k set (then clear), in a fixed
    # generic direction; a value of any other example that moves is exact evidence of
    # mixing, and 2 * ceil(log2 batch) probes separate every pair of examples
    rng = np.random.default_rng(0)
    direction = [jnp.asarray(rng.standard_normal(np.shape(s)), jnp.result_type(s))
                 for s in stream_vals]
    bits = (batch - 1).bit_length()

    def probe(kb):
        moved = ((jnp.arange(batch) >> (kb // 2)) & 1) == (kb % 2)
        mask = lambda a, m: jnp.where(m.reshape((batch,) + (1,) * (a.ndim - 1)), a, 0)
        ts = cut_tangents([mask(d, moved) for d in direction])
        return sum(jnp.sum(jnp.abs(mask(t, ~moved))) for t in ts
                   if jnp.issubdtype(t.dtype, jnp.inexact))

    leak = jnp.sum(lax.map(probe, jnp.arange(2 * bits))) if bits else 0.0
    independent = leak == 0
    if debug:
        msg = (f"{BATCH_MIXED}: moving some examples of the input changed other "
               f"examples' values before the batch meets at {where(meets[0].source_info)}; "
               "drop batch_axis (one JVP per input entry) or use mode='mixed'")

        def check(ok):
            if not bool(ok):
                raise FloatingPointError(msg)

        jax.debug.callback(check, independent)
    grads = []
    for k, s in enumerate(stream_vals):
        shape, features = np.shape(s), math.prod(np.shape(s)[1:])

        def directional(j, k=k, s=s, shape=shape, features=features):
            tangents = [jnp.zeros_like(t) for t in stream_vals]
            e_j = jax.nn.one_hot(j, features, dtype=jnp.result_type(s))
            tangents[k] = jnp.broadcast_to(e_j, (batch, features)).reshape(shape)
            return per_example_dot(cut_tangents(tangents))

        g = lax.map(directional, jnp.arange(features)).T.reshape(shape)
        grads.append(jnp.where(independent, g, jnp.nan).astype(s.dtype))
    return outs, grads


def _probes(graph: G.Graph, collected, leading=(), anchors=None):
    """Zeros shaped like the fragments ``collected`` (stacked over enclosing loops),
    and, for the loops in ``anchors`` (``node.index -> (k, carry positions)``), one
    zero per block of ``k`` steps on each swept carry."""
    probes = {}
    for node in graph.nodes:
        entry = collected.get(node.index)
        plan = (anchors or {}).get(node.index)
        if entry is None and plan is None:
            continue
        if node.primitive is lax.scan_p and not isinstance(entry, list):
            # a loop the sweep crosses step by step (a list: one fragment of the whole
            # loop's outputs, a loop it cannot enter, as any other node)
            body, _ = G.flatten(node.params["jaxpr"])
            length = node.params["length"]
            inner = _probes(body, entry or {}, leading + (length,))
            if plan is not None:
                k, positions = plan
                nc = node.params["num_consts"]
                inner = {"body": inner, "anchors": [
                    jnp.zeros((length // k,) + node.inputs[nc + i].aval.shape,
                              node.inputs[nc + i].aval.dtype) for i in positions]}
            probes[node.index] = inner
        else:
            probes[node.index] = [None if a is None else jnp.zeros(leading + a.shape, a.dtype)
                                  for a in entry]
    return probes


def _evaluate_probed(graph, invals, probes, anchors=None, inverted=None, packed=True):
    """Evaluate ``graph`` for mixed phase 1: probes added where records are taken,
    ``select_n`` masks kept bit-packed (``moonjax._src.masks``), and every loop
    evaluated step by step so that its body gets the same treatment. The loops in
    ``inverted`` (``node.index -> LoopBody``) that record nothing are run by inversion
    instead (``_reversible_scan``, anchored as ``"auto"`` says): their phase 1
    keeps one carry. ``packed=False`` (forward mode: JVPs, which a ``custom_vjp``
    does not take) keeps ``select_n`` as it is."""

    def bind(node, args):
        entry = probes.get(node.index)
        if node.index in (inverted or {}) and not entry:
            return _reversible_scan(node, inverted[node.index], "auto")(args)
        if node.primitive is lax.scan_p and not isinstance(entry, list):
            return loop(node, args, entry or {})
        if packed and node.primitive is lax.select_n_p and len(args) == 3 and masks.packable(
                node.inputs[0].aval, [a.aval for a in node.inputs[1:]]):
            outs = [masks.select(*args)]
        elif entry is None:
            return None
        else:
            outs = node.bind(*args)
        return outs if entry is None else [o if e is None else o + e
                                           for o, e in zip(outs, entry)]

    def loop(node, args, entry):
        p = node.params
        nc, ncar = p["num_consts"], p["num_carry"]
        body, body_consts = G.flatten(p["jaxpr"])

        def step(carry, inputs):
            x, pr = inputs
            outs = _evaluate_probed(body, [*body_consts, *args[:nc], *carry, *x], pr,
                                    packed=packed)
            return outs[:ncar], outs[ncar:]

        init, xs = list(args[nc:nc + ncar]), list(args[nc + ncar:])
        if "anchors" not in entry:
            carry, ys = lax.scan(step, init, (xs, entry), length=p["length"],
                                 reverse=p["reverse"], unroll=p["unroll"])
            return [*carry, *ys]
        k, positions = anchors[node.index]
        first = k - 1 if p["reverse"] else 0  # a block's first step, in loop order
        probes_ = entry["anchors"]

        def anchored(carry, inputs):
            # one loop, not a loop of blocks: a nested loop would make reverse mode
            # keep a copy of every step's weights; here they are the loop's own xs
            i, x, pr = inputs
            carry = list(carry)
            for pos, a in zip(positions, probes_):
                a = lax.dynamic_index_in_dim(a, i // k, keepdims=False)
                # its cotangent: the exact carry cotangent at the start of the block
                carry[pos] = carry[pos] + jnp.where(i % k == first, a, jnp.zeros_like(a))
            return step(carry, (x, pr))

        carry, ys = lax.scan(anchored, init, (jnp.arange(p["length"]), xs, entry["body"]),
                             length=p["length"], reverse=p["reverse"])
        return [*carry, *ys]

    return evaluate(graph, invals, bind)


# Anchors every AUTO_ANCHOR steps in the loops whose sweep (or inversion) divides by
# derivatives or solves with weights: rounding grows over so many steps at most.
AUTO_ANCHOR = 4

# Reversible backprop stores the carry every REVERSIBLE_ANCHOR steps in the loops whose
# inverse only divides elementwise by values the step computes (affine couplings): the
# division leaves the relative rounding as it is, and the subtraction before it loses
# a few bits where the shift dwarfs the result. Measured (float32, flowjax
# coupling_flow trained 2,000 Adam steps on digits): 32 unanchored steps drift 2.6e-7
# (2 eps), 60x inside the tolerance; each block's drift is still measured. Additions
# lose bits too where the side branch dwarfs what it is added to: Flax NNX additive
# couplings at their default init (float32, against float64 jax.grad) have 1.5x / 52x /
# 1e5x jax.grad's gradient error unanchored at depth 32 / 64 / 128, and 1.0x anchored
# every 16 (drift <= 8e-7): additive loops are anchored as affine ones.
REVERSIBLE_ANCHOR = 16


def interval(k: int | None, length: int) -> int | None:
    """The largest divisor of ``length`` not above ``k`` (``None``: no anchors)."""
    if k is None:
        return None
    k = max(d for d in range(1, min(k, length) + 1) if length % d == 0)
    return k if k < length else None


def anchor_plan(graph: G.Graph, stream_pos, anchor_every: int) -> dict:
    """``node.index -> (k, swept carry positions)`` for the top-level loops over the
    stream; ``k`` is the largest divisor of the loop length not above ``anchor_every``."""
    stream = [i in stream_pos for i in range(len(graph.invars))]
    dep = stream_dependence(graph, stream)
    plan = {}
    for node in graph.nodes:
        if node.primitive is not lax.scan_p:
            continue
        p = node.params
        nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
        positions = [i for i, a in enumerate(node.inputs[nc:nc + ncar])
                     if isinstance(a, G.Value) and id(a) in dep and is_float(a.aval)]
        k = interval(anchor_every, length)
        if positions and k is not None:
            plan[node.index] = (k, positions)
    return plan


def mixed_with_probes(graph, invals, stream_pos, collected, anchors=None, inverted=None):
    """Mixed phase 1 that also records exact cotangents the sweep will use: the
    output cotangents of the non-submersive spine steps in ``collected`` (the
    fragments the sweep cannot recover) and, for the loops in ``anchors``, the carry
    cotangent at the start of every block. A zero is added at each such value, and
    its cotangent is the record. The loops in ``inverted`` are run by inversion (see
    ``_evaluate_probed``)."""
    probes = _probes(graph, collected, anchors=anchors)

    def f(stream_vals, probe_vals):
        vals = list(invals)
        for i, s in zip(stream_pos, stream_vals):
            vals[i] = s
        outs = _evaluate_probed(graph, vals, probe_vals, anchors, inverted)
        return outs[0], outs[1:]

    loss, pullback, aux = jax.vjp(f, [invals[i] for i in stream_pos], probes, has_aux=True)
    g_stream, recorded = pullback(jnp.ones_like(loss))
    for idx, (k, _) in (anchors or {}).items():
        recorded[idx]["k"] = k
    return [loss, *aux], list(g_stream), recorded
