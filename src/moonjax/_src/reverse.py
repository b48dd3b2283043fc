"""Reverse mode over the whole program, each loop and run in its treatment.

``backprop`` is ``jax.vjp`` of the program with every ``lax.scan`` over the stream
replaced by its treatment's ``custom_vjp`` (reversible backprop where it inverts,
checkpointed reverse mode where the plan says so) and every run of unrolled layers
that inverts by ``reversible_run``: the default's gradient wherever no sweep runs, and
``mode="reversible"``. Everything else is plain reverse mode, as ``jax.grad``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from moonjax._src import graph as G
from moonjax._src.checkpointed import checkpointed_scan
from moonjax._src.plan import CHECKPOINTED, analyse
from moonjax._src.program import Program
from moonjax._src.reversible import (
    fallback_interval,
    reversible_loops,
    reversible_scan,
)
from moonjax._src.sweep import stream_dependence
from moonjax._src.unrolled import reversible_run
from moonjax._src.unrolled import runs as unrolled_runs


def gradient(program: Program, plan, anchor_every, fragments: bool):
    """Reverse mode for every cotangent at once: ``(value, cotangents by flat leaf)``.
    With a ``plan`` (``moonjax._src.plan.Plan``, the default's), each loop and run
    as it says and a drifting block recomputed exactly; without (``mode=
    "reversible"``), every loop and run that inverts by reversible backprop, the
    others checkpointed with ``fragments`` (else the first raises), drifts reported."""
    static = program.static
    wanted = list(dict.fromkeys(static.stream + static.params))
    if plan is None and not static.stream or plan is not None and not (plan.loops or
                                                                       plan.runs):
        return program.vjp(wanted)  # nothing to substitute: jax.grad's own program
    traced = program.with_aux()
    stream_at = [traced.pos[j] for j in static.stream]
    if plan is not None and program.has_aux:  # the plan of the program with its aux
        plan = analyse(traced.graph, stream_at)
    checkpointed = {} if plan is None else {lp.node.index: lp.anchor_every
                                            for lp in plan.loops
                                            if lp.treatment == CHECKPOINTED}
    outs, cts = backprop(traced.graph, traced.invals, stream_at,
                         [traced.pos[j] for j in wanted], anchor_every, checkpointed,
                         fallback=fragments, recompute=plan is not None,
                         runs=None if plan is None else plan.runs)
    loss, aux = traced.unpack(outs)
    return ((loss, aux) if program.has_aux else loss), dict(zip(wanted, cts))


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


def backprop(graph, invals, stream_pos, diff_pos, anchor_every="auto", checkpointed=None,
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
    mode instead (``checkpointed_scan``); with ``fallback``, also every loop over
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
            return checkpointed_scan(node, checkpointed[node.index])(args)
        loop = loops.get(node.index)
        return None if loop is None else reversible_scan(node, loop, anchor_every,
                                                          recompute)(args)

    def f(*diff_vals):
        vals = list(invals)
        for i, s in zip(diff_pos, diff_vals):
            vals[i] = s
        outs = evaluate(graph, vals, bind, runs, recompute)
        return outs[0], outs[1:]

    loss, pullback, aux = jax.vjp(f, *[invals[i] for i in diff_pos], has_aux=True)
    return [loss, *aux], list(pullback(jnp.ones_like(loss)))
