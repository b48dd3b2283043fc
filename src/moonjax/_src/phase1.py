"""Phase 1: the exact cotangent ``g₀`` of the stream, three ways.

* ``mixed``: a reverse pass for the input cotangent only (see ``api``): parameters are
  constants, so it stores what the input vjp needs (weights, sign masks), not the
  activations the parameter gradients would need.
* ``reversible``: the same reverse pass, but every ``lax.scan`` over layers keeps only
  its final carry; going back, each layer's input is rebuilt from its output by
  inverting the layer (:mod:`moonjax._src.inverse`). Memory is flat in depth.
* ``forward``: forward-mode JVPs, one per entry of the input, one at a time. Nothing is
  stored; time grows with the size of the input.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moonjax._src import graph as G
from moonjax._src.inverse import invert
from moonjax._src.scan import blocks, unblocks
from moonjax._src.sweep import is_float, stream_dependence


def evaluate(graph: G.Graph, invals, bind=None):
    """Evaluate ``graph``; ``bind(node, args)`` may replace a node's evaluation."""
    env = {id(v): x for v, x in zip(graph.invars, invals)}
    read = lambda a: a.val if isinstance(a, G.Lit) else env[id(a)]
    for node in graph.nodes:
        args = [read(a) for a in node.inputs]
        outs = bind(node, args) if bind is not None else None
        if outs is None:
            outs = node.bind(*args)
        env.update(zip(map(id, node.outputs), outs))
    return [read(o) for o in graph.outvars]


def reversible(graph, invals, stream_pos):
    """``(outvals, g_stream)`` with loops differentiated by inversion."""
    stream = [i in stream_pos for i in range(len(invals))]
    dep = stream_dependence(graph, stream)

    def bind(node, args):
        if node.primitive is not lax.scan_p:
            return None
        p = node.params
        nc, ncar = p["num_consts"], p["num_carry"]
        ins = node.inputs
        is_dep = lambda a: isinstance(a, G.Value) and id(a) in dep
        if any(is_dep(a) for a in ins[:nc]) or any(is_dep(a) for a in ins[nc + ncar:]):
            return None  # the loop reads the stream outside its carry: plain reverse mode
        if not any(is_dep(a) for a in ins[nc:nc + ncar]):
            return None
        return _reversible_scan(node)(args[:nc], args[nc:nc + ncar], args[nc + ncar:])

    def f(*stream_vals):
        vals = list(invals)
        for i, s in zip(stream_pos, stream_vals):
            vals[i] = s
        outs = evaluate(graph, vals, bind)
        return outs[0], outs[1:]

    loss, pullback, aux = jax.vjp(f, *[invals[i] for i in stream_pos], has_aux=True)
    return [loss, *aux], list(pullback(jnp.ones_like(loss)))


def _float0_like(x):
    return np.zeros(np.shape(x), jax.dtypes.float0)


def _ct_zero(x):
    return jnp.zeros_like(x) if is_float(jax.typeof(x)) else _float0_like(x)


def _reversible_scan(node):
    p = node.params
    nc, ncar = p["num_consts"], p["num_carry"]
    body, body_consts = G.flatten(p["jaxpr"])
    n_lead = len(body_consts)

    def step_fn(consts, carry, x):
        outs = evaluate(body, [*body_consts, *consts, *carry, *x])
        return outs[:ncar], outs[ncar:]

    @jax.custom_vjp
    def run(consts, init, xs):
        outs = node.bind(*consts, *init, *xs)
        return list(outs[:ncar]), list(outs[ncar:])

    def fwd(consts, init, xs):
        carry, ys = run(consts, init, xs)
        return (carry, ys), (consts, xs, carry)

    def bwd(res, cts):
        consts, xs, final = res
        g_carry, g_ys = cts
        known_in = {id(v): x for v, x in zip(body.invars[:n_lead + nc],
                                             [*body_consts, *consts])}
        carry_vars = body.invars[n_lead + nc:n_lead + nc + ncar]
        xs_vars = body.invars[n_lead + nc + ncar:]

        def step(state, inp):
            carry_out, g = state
            x, g_y = inp
            known = dict(known_in)
            known.update(zip(map(id, xs_vars), x))
            for o, c in zip(body.outvars[:ncar], carry_out):
                if isinstance(o, G.Value):
                    known.setdefault(id(o), c)
            carry_in = invert(body, known, carry_vars)
            _, vjp = jax.vjp(lambda c: step_fn(consts, c, x), carry_in)
            (g_in,) = vjp((g, g_y))
            return (carry_in, g_in), None

        (_, g_init), _ = lax.scan(step, (list(final), list(g_carry)), (list(xs), list(g_ys)),
                                  length=p["length"], reverse=not p["reverse"])
        return ([_ct_zero(c) for c in consts], g_init, [_ct_zero(x) for x in xs])

    run.defvjp(fwd, bwd)
    return lambda consts, init, xs: _flat(run(list(consts), list(init), list(xs)))


def _flat(pair):
    carry, ys = pair
    return [*carry, *ys]


def forward(graph, invals, stream_pos):
    """``(outvals, g_stream)`` by one JVP per stream entry (no residuals at all)."""
    stream_vals = [invals[i] for i in stream_pos]

    def f(*vals_):
        vals = list(invals)
        for i, s in zip(stream_pos, vals_):
            vals[i] = s
        return evaluate(graph, vals)

    outs = f(*stream_vals)
    grads = []
    for k, s in enumerate(stream_vals):
        size = math.prod(np.shape(s))

        def directional(j, k=k, s=s, size=size):
            tangents = [jnp.zeros_like(t) for t in stream_vals]
            tangents[k] = jax.nn.one_hot(j, size, dtype=jnp.result_type(s)).reshape(
                np.shape(s))
            return jax.jvp(lambda *v: f(*v)[0], stream_vals, tangents)[1]

        grads.append(lax.map(directional, jnp.arange(size)).reshape(np.shape(s)))
    return outs, grads


MODES = {"reversible": reversible, "forward": forward}


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
        if node.primitive is lax.scan_p:
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


def _evaluate_probed(graph, invals, probes, anchors=None):
    def bind(node, args):
        entry = probes.get(node.index)
        if entry is None:
            return None
        if node.primitive is lax.scan_p:
            p = node.params
            nc, ncar = p["num_consts"], p["num_carry"]
            body, body_consts = G.flatten(p["jaxpr"])

            def step(carry, inputs):
                x, pr = inputs
                outs = _evaluate_probed(body, [*body_consts, *args[:nc], *carry, *x], pr)
                return outs[:ncar], outs[ncar:]

            init, xs = list(args[nc:nc + ncar]), list(args[nc + ncar:])
            if "anchors" not in entry:
                carry, ys = lax.scan(step, init, (xs, entry), length=p["length"],
                                     reverse=p["reverse"])
                return [*carry, *ys]
            k, positions = anchors[node.index]
            nb = p["length"] // k

            def block(carry, inputs):
                x_blk, pr_blk, anchor = inputs
                carry = list(carry)
                for i, a in zip(positions, anchor):
                    carry[i] = carry[i] + a  # its cotangent: the exact one at block start
                return lax.scan(step, carry, (x_blk, pr_blk), length=k, reverse=p["reverse"])

            carry, ys = lax.scan(block, init, (blocks(xs, nb, k), blocks(entry["body"], nb, k),
                                               entry["anchors"]),
                                 length=nb, reverse=p["reverse"])
            return [*carry, *unblocks(ys)]
        return [o if e is None else o + e for o, e in zip(node.bind(*args), entry)]

    return evaluate(graph, invals, bind)


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
        k = max(d for d in range(1, min(anchor_every, length) + 1) if length % d == 0)
        if positions and k < length:
            plan[node.index] = (k, positions)
    return plan


def mixed_with_probes(graph, invals, stream_pos, collected, anchors=None):
    """Mixed phase 1 that also records exact cotangents the sweep will use: the
    output cotangents of the non-submersive spine steps in ``collected`` (the
    fragments the sweep cannot recover) and, for the loops in ``anchors``, the carry
    cotangent at the start of every block. A zero is added at each such value, and
    its cotangent is the record."""
    probes = _probes(graph, collected, anchors=anchors)

    def f(stream_vals, probe_vals):
        vals = list(invals)
        for i, s in zip(stream_pos, stream_vals):
            vals[i] = s
        outs = _evaluate_probed(graph, vals, probe_vals, anchors)
        return outs[0], outs[1:]

    loss, pullback, aux = jax.vjp(f, [invals[i] for i in stream_pos], probes, has_aux=True)
    g_stream, recorded = pullback(jnp.ones_like(loss))
    for idx, (k, _) in (anchors or {}).items():
        recorded[idx]["k"] = k
    return [loss, *aux], list(g_stream), recorded
