"""The sweep of ``lax.scan``: a scan whose body runs the sweep.

A network written as ``scan`` over stacked layer parameters sweeps as a scan over the
same parameters: the carry is ``(h, g_h, Σ const cotangents)``, each step sweeps one
layer's body, and the per-layer parameter cotangents come out as the scan's stacked
outputs. Compile time stays independent of depth and nothing per layer is kept.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax

from moonjax._src import drift as D
from moonjax._src import graph as G
from moonjax._src.errors import SpineStructureError, where
from moonjax._src.rules import ct_dtype
from moonjax._src.sweep import LOOPS, Collect, is_float, stream_dependence, sweep


def _stream_carry(graph, n_lead, nc, ncar, init_stream):
    """Fixed point: which carries depend on the stream after any number of steps."""
    flags = list(init_stream)
    while True:
        stream = [False] * n_lead + [False] * nc + flags + [False] * (
            len(graph.invars) - n_lead - nc - ncar)
        dep = stream_dependence(graph, stream)
        new = [
            f or (isinstance(o, G.Value) and id(o) in dep)
            for f, o in zip(flags, graph.outvars[:ncar])
        ]
        if new == flags:
            return flags
        flags = new


def sweep_scan(node, invals, g_carry, debug, fragments=None, anchors=None):
    """Sweep a ``scan`` node forwards; returns ``(outs, out_cts, in_cts)``.

    ``g_carry`` maps carry positions (that depend on the stream) to their cotangents.
    ``in_cts`` holds the cotangents of the consts and ``xs`` (``None`` for carries).
    ``fragments`` is a ``Collect`` or the body's recorded fragments stacked over steps.
    ``anchors``, if given, is ``(k, stacked)``: the exact carry cotangents that phase 1
    recorded at the start of every block of ``k`` steps; the sweep restarts from them,
    which bounds the growth of rounding error to ``k`` layers.
    """
    p = node.params
    nc, ncar = p["num_consts"], p["num_carry"]
    graph, body_consts = G.flatten(p["jaxpr"])
    n_lead = len(body_consts)
    consts, init, xs = invals[:nc], invals[nc:nc + ncar], invals[nc + ncar:]
    flags = _stream_carry(graph, n_lead, nc, ncar, [i in g_carry for i in range(ncar)])
    # carries that start as a constant and come to depend on the input (a flow's
    # log-determinant ``ld + sum(log|s|)``): not swept; each step's carry output takes
    # phase 1's recorded cotangent, and reverse mode takes it back to the carry input
    recorded = [i for i, f in enumerate(flags) if f and i not in g_carry]
    for i in recorded:
        if fragments is None:
            raise SpineStructureError(
                f"scan carry {i} starts as a constant but comes to depend on the network "
                "input; start it from the input, or keep it out of the loop (or let "
                "phase 1 record its cotangent: fragments=True)")
    for i, f in enumerate(flags):
        if not f and is_float(node.inputs[nc + i].aval):
            raise SpineStructureError(
                f"scan carry {i} is a float that does not depend on the network input; "
                "moonjax sweeps loops whose float carries are the activations only")
    flags = [f and i not in recorded for i, f in enumerate(flags)]
    stream = [False] * (n_lead + nc) + flags + [False] * len(xs)
    float_consts = [i for i in range(nc) if is_float(node.inputs[i].aval)]
    float_xs = [i for i in range(len(xs)) if is_float(node.inputs[nc + ncar + i].aval)]
    stream_out = [i for i, o in enumerate(graph.outvars)
                  if i >= ncar and is_float(o.aval)]

    collect = isinstance(fragments, Collect)

    def step(state, inputs):
        carry, g, acc = state
        x_slice, frag = inputs
        body_in = list(body_consts) + list(consts) + list(carry) + list(x_slice)
        known = {n_lead + nc + i: g[k] for k, i in enumerate(sorted(g_carry))}
        with D.measuring() as (inner, amplifiers):
            outs, out_cts, in_cts = sweep(graph, body_in, stream, known, head=False,
                                          debug=debug, fragments=fragments if collect else frag,
                                          recorded_outputs=recorded)
        body_meetings[:] = [m for m, _ in inner]
        for a in amplifiers:
            D.amplifier(a)
        new_g = [out_cts[i].astype(c.dtype) for i, c in zip(sorted(g_carry), g)]
        acc = [a + _or_zero(in_cts[n_lead + i], node.inputs[i].aval)
               for a, i in zip(acc, float_consts)]
        xs_ct = [_or_zero(in_cts[n_lead + nc + ncar + i], node.inputs[nc + ncar + i].aval)
                 for i in float_xs]
        ys_ct = [_or_zero(out_cts[i], graph.outvars[i].aval) for i in stream_out]
        ys_ct += [_or_zero(in_cts[n_lead + nc + i], node.inputs[nc + i].aval)
                  for i in recorded]  # the recorded carries' input cotangents
        return (outs[:ncar], new_g, acc), (outs[ncar:], xs_ct, ys_ct, [d for _, d in inner])

    acc0 = [_or_zero(None, node.inputs[i].aval) for i in float_consts]
    g0 = [g_carry[i] for i in sorted(g_carry)]
    frags = None if collect else fragments
    body_meetings: list = []
    loop_at = where(node.source_info)
    if anchors is None:
        (carry, g, acc), (ys, xs_ct, ys_ct, drifts) = lax.scan(
            step, (list(init), g0, acc0), (list(xs), frags),
            length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
    else:
        k, stacked = anchors
        first = k - 1 if p["reverse"] else 0  # a block's first step, in loop order

        def anchored(state, inputs):
            # one loop, not a loop of blocks: a loop of blocks stacks its blocks'
            # outputs [nb, k, ...] and copies them into the loop's own (a second copy of
            # every step's parameter cotangent), the inner loop's [k, ...] beside them
            i, x_slice, frag = inputs
            carry, g, acc = state
            anchor = [lax.dynamic_index_in_dim(a, i // k, keepdims=False).astype(b.dtype)
                      for a, b in zip(stacked, g)]
            # at a block's first step, restart from the exact cotangent and measure the
            # drift there (under a cond: the other steps skip the measurement)
            start = i % k == first
            met = lax.cond(start, _drifts, _no_drifts, g, anchor)
            g = [jnp.where(start, a, b) for a, b in zip(anchor, g)]
            state, outs = step((carry, g, acc), (x_slice, frag))
            return state, (outs, met)

        (carry, g, acc), ((ys, xs_ct, ys_ct, drifts), met) = lax.scan(
            anchored, (list(init), g0, acc0), (jnp.arange(p["length"]), list(xs), frags),
            length=p["length"], reverse=p["reverse"], unroll=p["unroll"])
        for m in met:
            D.note_value(D.Meeting("an anchor", loop_at), jnp.max(m))
    for m, d in zip(body_meetings, drifts):
        D.note_value(dataclasses.replace(m, loop=m.loop or loop_at), jnp.max(d))
    outs = list(carry) + list(ys)
    out_cts = [None] * len(outs)
    for k, i in enumerate(sorted(g_carry)):
        out_cts[i] = g[k]
    for k, i in enumerate(stream_out):
        out_cts[i] = ys_ct[k]
    in_cts = [None] * len(invals)
    for k, i in enumerate(recorded):  # the first step's carry input is the init
        in_cts[nc + i] = ys_ct[len(stream_out) + k][-1 if p["reverse"] else 0]
    for a, i in zip(acc, float_consts):
        in_cts[i] = a
    for c, i in zip(xs_ct, float_xs):
        in_cts[nc + ncar + i] = c
    return outs, out_cts, in_cts


def _drifts(g, anchor):
    """The drift of the swept cotangents ``g`` from the exact ones, the ``anchor``."""
    return [D.relative(b, a) for a, b in zip(anchor, g)]


def _no_drifts(g, anchor):
    """Zeros in place of ``_drifts`` (a step that meets no anchor)."""
    return [jnp.zeros((), jnp.promote_types(a.dtype, jnp.float32)) for a in anchor]


def _or_zero(c, aval):
    """``c``, or zeros, in the dtype the sweep keeps cotangents of ``aval`` in."""
    dtype = ct_dtype(aval.dtype)
    return c.astype(dtype) if c is not None else jnp.zeros(aval.shape, dtype)


LOOPS[lax.scan_p] = sweep_scan
