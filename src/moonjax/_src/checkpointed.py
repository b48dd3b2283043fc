"""Checkpointed reverse mode for a ``lax.scan`` over layers: exact for any body.

The forward pass keeps the carry every ``k`` steps (``k`` about ``sqrt(length)``);
going back, each block is run forwards once more from its stored start, keeping its
step inputs, and each step's vjp is taken. The loops that do not invert (or whose
inverse solves with weights, where rounding can grow without bound) get this.
"""

from __future__ import annotations

import math

import jax.numpy as jnp

from moonjax._src import graph as G
from moonjax._src.loops import (
    Blocks,
    bound,
    exact_block,
    floats,
    of_inputs,
    run_blocks,
    spread,
    step_function,
    y_avals,
)


def checkpoint_interval(length: int) -> int:
    """Steps per block of a checkpointed loop: about ``sqrt(length)``, so that the
    carries stored at the blocks' starts and one block's step inputs, rebuilt while it
    is differentiated, weigh about the same."""
    return max(1, min(length, round(math.sqrt(length))))


def checkpointed_scan(node, k: int):
    """The loop as reverse mode over blocks of ``k`` steps, as a function of the
    node's inputs: the forward pass keeps the carry at every block's start; going
    back, each block is run forwards once more from it, keeping its step inputs, and
    each step's vjp gives the input, consts and ``xs`` cotangents
    (:func:`exact_block`). Exact (reverse mode) for any body; each step runs
    forwards twice more (the block's rebuild and inside its vjp). The last block may
    be shorter."""
    p = node.params
    nc, ncar, length, rev = p["num_consts"], p["num_carry"], p["length"], p["reverse"]
    body, body_consts = G.flatten(p["jaxpr"])
    blocks = Blocks(length, k, rev)
    step_fn = step_function(body, body_consts, ncar)
    run = bound(node)

    def fwd(consts, init, xs):
        carry, ys, starts = run_blocks(step_fn, blocks, consts, init, xs,
                                        y_avals(body, ncar))
        return (carry, ys), (consts, init, xs, starts)

    def bwd(res, cts):
        consts, init, xs, starts = res
        g_carry, g_ys = cts
        fc, fx = floats(consts), floats(xs)

        def block(state, b, n):
            g, g_consts, g_xs = state
            g, gc, g_xs = exact_block(step_fn, blocks, consts, xs, g_ys, b, n,
                                       blocks.start(init, starts, b), g, g_xs)
            return g, [a + c for a, c in zip(g_consts, gc)], g_xs

        state = (list(g_carry), [jnp.zeros_like(consts[i]) for i in fc],
                 [jnp.zeros_like(xs[i]) for i in fx])
        g_init, g_consts, g_xs = blocks.backward(block, state)
        return spread(consts, fc, g_consts), g_init, spread(xs, fx, g_xs)

    run.defvjp(fwd, bwd)
    return of_inputs(run, nc, ncar)
