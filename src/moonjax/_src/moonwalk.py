"""Moonwalk: phase 1 for the stream's cotangent, then the inverse-forward sweep.

``gradient`` runs ``mode="mixed"`` (a reverse pass for the input cotangent only,
recording the exact cotangent where the sweep needs it) or ``mode="forward"`` (JVPs),
then the sweep (``moonjax._src.sweep``) walks the network forwards and pulls each
layer's cotangent back to its parameters. One abstract pass of the sweep first finds
what phase 1 must record (``_sweep_needs``).
"""

from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from moonjax._src import drift as D
from moonjax._src import graph as G
from moonjax._src.errors import (
    NotSubmersiveError,
    SpineStructureError,
    UnsupportedPrimitiveError,
)
from moonjax._src.loops import AUTO_ANCHOR
from moonjax._src.phase1 import anchor_plan, forward_batched, mixed_with_probes
from moonjax._src.phase1 import forward as forward_phase1
from moonjax._src.plan import REVERSIBLE
from moonjax._src.program import Program
from moonjax._src.sweep import REPORT, SHIFTS, Collect, sweep

_UNSET = object()


def gradient(program: Program, plan, mode: str, fragments: bool, anchor_every, debug: bool,
             batch_axis=None):
    """Phase 1 by ``mode`` (``"mixed"`` or ``"forward"``), then the sweep: ``(value,
    cotangents by flat leaf)``. The loops ``plan`` (``moonjax._src.plan.Plan`` or
    ``None``) runs by reversible backprop are run by inversion in mixed phase 1."""
    static, has_aux, flat = program.static, program.has_aux, program.flat
    traced = program.loss_only
    graph, invals, pos = traced.graph, traced.invals, traced.pos
    stream_pos = [pos[j] for j in static.stream]
    inverted = {} if plan is None else {lp.node.index: lp.body for lp in plan.loops
                                        if lp.treatment == REVERSIBLE}
    stream_mask = [i in stream_pos for i in range(len(invals))]
    params_mask = [False] * len(invals)
    for j in static.params:
        params_mask[pos[j]] = True
    run_sweep = functools.partial(sweep, graph, invals, stream_mask, head=True,
                                  params=params_mask, debug=debug)
    aux, recorded = _UNSET, None
    if mode == "forward" and batch_axis is not None:
        with_aux = program.with_aux()
        outs, g_stream = forward_batched(with_aux.graph, with_aux.invals,
                                         [with_aux.pos[j] for j in static.stream],
                                         debug=debug)
        loss, aux = with_aux.unpack(outs)
    elif mode == "forward":  # JVPs for the stream and the fragments
        collected = _sweep_needs(graph, stream_pos, run_sweep, fragments, None)[0]
        outs, g_stream, recorded = forward_phase1(graph, invals, stream_pos, collected)
        loss = outs[0]
    else:
        collected, anchors = _sweep_needs(graph, stream_pos, run_sweep, fragments,
                                          anchor_every)
        if has_aux and not (collected or anchors or inverted):
            # nothing to record: phase 1 is the reverse pass of the user's function
            (loss, aux), found = program.vjp(static.stream)
            g_stream = [found[j] for j in static.stream]
        else:
            outs, g_stream, recorded = mixed_with_probes(graph, invals, stream_pos,
                                                         collected, anchors, inverted)
            loss = outs[0]
    if has_aux and aux is _UNSET:
        aux = program.call(flat)[1]
    known = {pos[j]: g for j, g in zip(static.stream, g_stream)}
    if batch_axis is not None:
        try:
            _, _, in_cts = run_sweep(known)
        except (NotSubmersiveError, UnsupportedPrimitiveError, SpineStructureError) as e:
            if not fragments:
                raise
            raise type(e)(f"{e}\n  note: batch_axis=0 records no fragments; without it "
                          "mode='forward' records what this layer erases") from None
    else:
        _, _, in_cts = run_sweep(known, fragments=recorded)
    cts = {j: in_cts[pos[j]] for j in static.params}
    cts.update(zip(static.stream, g_stream))
    return ((loss, aux) if has_aux else loss), cts


# ``anchor_every="auto"``: loops whose swept layers divide by a derivative or solve
# with a weight (error can grow layer by layer) are anchored; volume-preserving ones
# (additive couplings, shifts, moves) are not. A loop of ``L`` steps whose only
# nonlinearity is a known slope ``s`` (leaky ReLU: ``mul`` by a constant and
# ``select_n``) is anchored every ``k = min(sqrt(L), log(AUTO_GROWTH) / log(1/s))``
# steps (the largest divisor of ``L`` not above it), from an error estimate: from an
# anchor, the sweep's cotangent error grows with the steps it takes (the anchors' drift
# measures it), backprop's own error with the depth, at least as ``sqrt(L)`` (``L``
# independent roundings), so ``k ~ sqrt(L)`` keeps the sweep's part within backprop's;
# ``(1/s)^k <= AUTO_GROWTH`` bounds the worst case (every unit on the slope) below
# the drift tolerance (``drift.ULPS_32`` = 128 eps). Measured (bench leaky_mlp, slope
# 0.8, width 64, batch 256, float32, seeds 0-2; error relative to a float64 jax.grad):
#   anchors' drift, any depth: k = 8: 20 eps, 16: 31, 32: 55, 64: 132 (fails the check)
#   error / jax.grad's, depth 64 (jax.grad 0.9e-6-1.0e-6): k = 4: 1.3x, 8: 1.5x,
#     16: 1.95-2.02x, 32: 3.0x; depth 256 (jax.grad 2.7e-4-3.9e-4, the forward pass's
#     rounding amplified): 1.00x for every k <= 32
#   so k = 8 at depth 64 and 16 at depth 256 (32 would pass there too; the slope bound,
#   20 steps at s = 0.8, keeps it below): 1.76 MiB of XLA temp at depth 256, 0.09x
#   jax.grad's, of which the 16 anchors are 1 MiB.
# Other amplifying loops (derivatives the sweep divides by that the plan cannot bound:
# tanh, a flow's scale) are anchored every AUTO_ANCHOR steps (loops.AUTO_ANCHOR).
AUTO_GROWTH = 100.0
PIECEWISE_LINEAR = SHIFTS | {"select_n"}


def _amplifies(step) -> bool:
    for s in step.inner:
        if s.kind == "spine" and any(n.primitive.name == "dot_general" for n in s.nodes):
            return True
        if s.kind == "region" and any(n.primitive.name not in SHIFTS for n in s.nodes):
            return True
    return False


def _auto_interval(step) -> int:
    """How often ``"auto"`` anchors a loop: every ``min(sqrt(L), k_s)`` steps where
    its body's only nonlinearity is a known slope ``s`` (leaky-ReLU's ``mul`` by a
    constant), ``k_s`` the most steps with ``(1/s)^k`` at most ``AUTO_GROWTH``; every
    ``AUTO_ANCHOR`` steps otherwise (see the measurements above)."""
    regions = [s for s in step.inner if s.kind == "region"]
    scalars = [_literal(a) for s in regions for n in s.nodes
               if n.primitive.name == "mul" for a in n.inputs]
    slopes = [abs(c) for c in scalars if c is not None and 0 < abs(c) < 1]
    if not slopes:
        return AUTO_ANCHOR
    k_slope = max(1, int(math.log(AUTO_GROWTH) / -math.log(min(slopes))))
    if not all(_by_constant(n) for s in regions for n in s.nodes):
        return min(AUTO_ANCHOR, k_slope)  # other derivatives too: not bounded by s
    length = step.nodes[0].params["length"]
    return min(max(1, round(math.sqrt(length))), k_slope)


def _by_constant(node) -> bool:
    """Whether ``node`` is piecewise linear with constant slopes (a ``mul`` by a
    scalar literal, a ``select_n``, a shift)."""
    if node.primitive.name == "mul":
        return any(_literal(a) is not None for a in node.inputs)
    return node.primitive.name in PIECEWISE_LINEAR


def _literal(a) -> float | None:
    """The value of a scalar literal operand, looking through dtype conversions."""
    while isinstance(a, G.Value) and a.producer is not None and (
            a.producer.primitive.name in ("convert_element_type", "broadcast_in_dim")):
        a = a.producer.inputs[0]
    if isinstance(a, G.Lit) and np.ndim(a.val) == 0:
        return float(a.val)
    return None


def _auto_anchors(graph, stream_pos, steps) -> dict:
    """``anchor_every="auto"``: the loops whose swept body amplifies rounding (every 2
    steps at most for 16-bit inputs, whose phase-1 cotangent starts at ~1e-3 error)."""
    half = any(graph.invars[i].aval.dtype.itemsize < 4 for i in stream_pos)
    plan = {}
    for s in steps:
        if s.kind == "scan" and _amplifies(s):
            i = s.nodes[0].index
            k = min(_auto_interval(s), 2) if half else _auto_interval(s)
            entry = anchor_plan(graph, stream_pos, k).get(i)
            if entry is not None:
                plan[i] = entry
    return plan


@contextlib.contextmanager
def _reporting(active: bool):
    """The sweep's steps (``REPORT``) while the block runs, if ``active``."""
    steps: list = []
    token = REPORT.set(steps if active else None)
    try:
        yield steps
    finally:
        REPORT.reset(token)


def _sweep_needs(graph, stream_pos, run_sweep, fragments: bool, anchor_every):
    """What mixed phase 1 records for the sweep: ``(fragments, anchors)``. One abstract
    pass of the sweep (shapes only, under ``jax.eval_shape``: none of it runs)
    finds the spine steps it cannot invert (the fragments, with ``fragments``; without,
    the first such step raises here) and the steps it crosses; the anchored loops are
    every top-level loop over the stream for an int ``anchor_every``, those whose swept
    body amplifies rounding for ``"auto"``."""
    collected = Collect() if fragments else None
    auto = anchor_every == "auto"
    zeros = {i: jnp.zeros(graph.invars[i].aval.shape, graph.invars[i].aval.dtype)
             for i in stream_pos}
    def dry_run():  # for what it finds and reports; its values are not wanted
        run_sweep(zeros, fragments=collected)

    with _reporting(auto) as steps, D.measuring():  # the dry run's drifts: none
        jax.eval_shape(dry_run)
    if isinstance(anchor_every, int):
        anchors = anchor_plan(graph, stream_pos, anchor_every)
    else:
        anchors = _auto_anchors(graph, stream_pos, steps) if auto else {}
    return collected if collected is not None else Collect(), anchors
