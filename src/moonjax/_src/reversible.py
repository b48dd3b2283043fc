"""Reversible backprop for a ``lax.scan`` over layers that inverts.

The forward pass keeps the loop's output (and its carry every ``k`` steps, the
anchors); going back, each step's input is rebuilt from its output by inverting the
body (``moonjax._src.inverse``) and the step's vjp gives its input and parameter
cotangents on the spot. Memory is flat in depth. Runs of unrolled layers get the same
treatment in ``moonjax._src.unrolled``.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from moonjax._src import drift as D
from moonjax._src import graph as G
from moonjax._src.checkpointed import checkpoint_interval
from moonjax._src.errors import where
from moonjax._src.inverse import Inversion, invert, plan_inversion
from moonjax._src.loops import (
    AUTO_ANCHOR,
    Blocks,
    block_vjps,
    bound,
    exact_block,
    floats,
    most,
    of_inputs,
    run_blocks,
    spread,
    step_function,
    y_avals,
)
from moonjax._src.sweep import is_float
from moonjax._src.unrolled import recompute_tolerance

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


def reversible_anchor(loop: LoopBody, anchor_every, length: int,
                      recompute: bool = True) -> int | None:
    """How often reversible backprop stores a loop's carry: every ``anchor_every``
    steps (an int, or ``None``: never), the last block shorter where it does not divide
    ``length``. For ``"auto"``: every ``REVERSIBLE_ANCHOR`` steps, or ``sqrt(length)``
    for longer loops (the stored carries and one block's, which the default's exact
    recompute holds, weigh about the same), where the inverse adds and moves only or
    divides elementwise by values the step computes (an affine coupling's scale); every
    ``AUTO_ANCHOR`` where it solves or takes Newton steps, and every ``AUTO_ANCHOR`` at
    most for a 16-bit carry. Without the ``recompute`` (forced modes refuse a drifting
    block instead), the stored carries are all the loop keeps, so twice as far apart:
    conv_revnet's mixed mode at depth 256 keeps 0.038x ``jax.grad``'s temp instead of
    0.059x, and a block that drifts is still refused, never returned."""
    if anchor_every == "auto":
        anchor_every = (max(REVERSIBLE_ANCHOR, round(math.sqrt(length)))
                        * (1 if recompute else 2)
                        if loop.inversion.divides_only else AUTO_ANCHOR)
        if loop.half:
            anchor_every = min(anchor_every, AUTO_ANCHOR)
    if anchor_every is None or anchor_every >= length:
        return None
    return anchor_every


def fallback_interval(node, loop: LoopBody | None) -> int | None:
    """The blocks of checkpointed reverse mode that forced reversible backprop runs a
    loop over the stream in when it cannot invert it (no inverse rule, or the stream
    read outside the carry: ``loop`` is ``None``); ``None`` for a loop it inverts."""
    if loop is not None and loop.inversion.stuck is None:
        return None
    return checkpoint_interval(node.params["length"])


def reversible_scan(node, loop: LoopBody, anchor_every, recompute: bool = False):
    """The loop as a ``custom_vjp`` whose backward pass inverts it step by step, as a
    function of the node's inputs. Anchored every ``k`` steps
    (``reversible_anchor``), the forward pass runs the loop in blocks of ``k`` steps
    (the last may be shorter) and stores the carry at every block's start; going back,
    each block is inverted from the next block's stored start (the last from the
    loop's output), each step's vjp taken on the spot, so rounding grows over ``k``
    steps at most. At each block's start the rebuilt carry is measured against the
    stored one (the self-check). With ``recompute`` (the default's choice), a block
    whose rebuilt carry drifted beyond
    :func:`~moonjax._src.unrolled.recompute_tolerance` is differentiated again exactly,
    as reverse mode from its stored start (:func:`exact_block`, under a ``lax.cond``:
    only the blocks that need it pay), and nothing is reported; without, the drift is
    reported for the guard to refuse."""
    p = node.params
    nc, ncar, length, rev = p["num_consts"], p["num_carry"], p["length"], p["reverse"]
    body, body_consts, inversion = loop.graph, loop.consts, loop.inversion
    n_lead = len(body_consts)
    carry_vars = body.invars[n_lead + nc:n_lead + nc + ncar]
    xs_vars = body.invars[n_lead + nc + ncar:]
    k = reversible_anchor(loop, anchor_every, length, recompute)
    if inversion.stuck is not None:
        invert(body, {}, carry_vars, inversion)  # raises, naming the stuck equation
    blocks = Blocks(length, length if k is None else k, rev)
    meeting = D.Meeting("the loop's input" if blocks.count == 1 else
                        f"the carry stored every {blocks.k} steps", where(node.source_info),
                        measured="the input rebuilt by inverting every step")

    step_fn = step_function(body, body_consts, ncar)
    run = bound(node)

    def fwd(consts, init, xs):
        if blocks.count == 1:  # the loop's input is the only anchor
            carry, ys = run(consts, init, xs)
            return (carry, ys), (consts, init, xs, carry, [])
        carry, ys, starts = run_blocks(step_fn, blocks, consts, init, xs,
                                        y_avals(body, ncar))
        return (carry, ys), (consts, init, xs, carry, starts)

    def bwd(res, cts):
        consts, init, xs, final, starts = res
        g_carry, g_ys = cts
        fc, fx = floats(consts), floats(xs)
        carried = floats(final)
        known_in = {id(v): x for v, x in zip(body.invars[:n_lead + nc],
                                             [*body_consts, *consts])}
        # each carry's drift is relative to its own exact value at the block's start;
        # one that starts at zero (a log-determinant accumulator) is measured against
        # what it grows to. (The loop's final norm as every carry's floor hid the drift
        # of activations that grow with depth: gradients 6x float32 jax.grad's error
        # were returned under the tolerance, docs/fidelity.md.) Outside: no copy.
        floors = {i: jnp.where(D.norm(init[i]) > 0, 0.0, D.norm(final[i])) for i in carried}
        tol = min((recompute_tolerance(jnp.result_type(final[i])) for i in carried),
                  default=0.0)

        def block(state, b, n):
            end, g, g_consts, g_xs, drift, again = state
            start = blocks.start(init, starts, b)

            def input_of(j, x, carry_out):  # the step's input, rebuilt from its output
                known = dict(known_in)
                known.update(zip(map(id, xs_vars), x))
                for o, c in zip(body.outvars[:ncar], carry_out):
                    if isinstance(o, G.Value):
                        known.setdefault(id(o), c)
                # the vjp at the rebuilt input itself, so that XLA computes what the
                # inversion and the step share (a coupling's side branch) once
                rebuilt = invert(body, known, carry_vars, inversion)
                return rebuilt, rebuilt

            g_in, gc, g_xs, rebuilt = block_vjps(
                step_fn, blocks, consts, xs, g_ys, b, n, g, g_xs, input_of, end)
            d = most([D.relative(rebuilt[i], start[i], floor=floors[i]) for i in carried])
            if recompute and carried:
                # a non-finite drift (NaN compares false) is a drift too
                g_in, gc, g_xs = lax.cond(
                    ~(d <= tol),
                    lambda ops: exact_block(step_fn, blocks, consts, xs, g_ys, b, n,
                                             start, g, ops[2]),
                    lambda ops: ops, (g_in, gc, g_xs))
            return (start, g_in, [a + c for a, c in zip(g_consts, gc)], g_xs,
                    jnp.maximum(drift, d), again + (~(d <= tol)).astype(jnp.int32))

        state = (list(final), list(g_carry), [jnp.zeros_like(consts[i]) for i in fc],
                 [jnp.zeros_like(xs[i]) for i in fx], most([]), jnp.zeros((), jnp.int32))
        _, g_init, g_consts, g_xs, drift, again = blocks.backward(block, state)
        if recompute and carried:
            D.note_recomputes(meeting, again, blocks.count)
        else:
            D.note_value(meeting, drift)
            if inversion.amplifier is not None:
                D.amplifier(inversion.amplifier.describe())
        return spread(consts, fc, g_consts), g_init, spread(xs, fx, g_xs)

    run.defvjp(fwd, bwd)
    return of_inputs(run, nc, ncar)
