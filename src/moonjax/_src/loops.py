"""What every treatment of a ``lax.scan`` over layers shares.

A loop's treatment (``moonjax._src.reversible``, ``moonjax._src.checkpointed``) is a
``custom_vjp`` around the scan node (``bound``) whose forward pass may run the loop in
blocks of ``k`` steps, keeping the carry at each block's start (``Blocks``,
``run_blocks``), and whose backward pass walks the blocks last to first, taking each
step's vjp at its input (``block_vjps``): rebuilt by inversion, or computed forwards
from the block's stored start (``exact_block``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moonjax._src import graph as G
from moonjax._src.sweep import is_float

# Anchors every AUTO_ANCHOR steps in the loops whose sweep (or inversion) divides by
# derivatives or solves with weights: rounding grows over so many steps at most.
AUTO_ANCHOR = 4


def float0_like(x):
    return np.zeros(np.shape(x), jax.dtypes.float0)


def ct_zero(x):
    return jnp.zeros_like(x) if is_float(jax.typeof(x)) else float0_like(x)


def step_function(body: G.Graph, body_consts, ncar: int):
    """One step of a flattened scan body: ``(consts, carry, x) -> (carry, y)``."""
    def step(consts, carry, x):
        outs = G.evaluate(body, [*body_consts, *consts, *carry, *x])
        return list(outs[:ncar]), list(outs[ncar:])
    return step


def bound(node):
    """The scan ``node`` as a ``custom_vjp`` function ``(consts, init, xs) -> (carry,
    ys)`` whose rules the caller defines."""
    ncar = node.params["num_carry"]

    @jax.custom_vjp
    def run(consts, init, xs):
        outs = node.bind(*consts, *init, *xs)
        return list(outs[:ncar]), list(outs[ncar:])

    return run


@dataclasses.dataclass(frozen=True)
class Blocks:
    """A loop of ``length`` steps in blocks of ``k`` (the last may be shorter), its
    ``xs`` and ``ys`` read and written in place by row (``rev``: a reverse scan), never
    sliced (a slice would copy the weights). Full blocks run in a ``lax.scan``, a
    short last one after it (no per-step branch)."""

    length: int
    k: int
    rev: bool

    @property
    def count(self) -> int:
        return -(-self.length // self.k)

    def row(self, b, j):
        """The row of ``xs`` and ``ys`` of block ``b``'s ``j``-th step."""
        t = b * self.k + j
        return self.length - 1 - t if self.rev else t

    def forward(self, block, state):
        """``block(state, b, n) -> state`` over the blocks in the loop's order (``n``
        steps each)."""
        full, rest = divmod(self.length, self.k)
        if full == 1 and not rest:
            return block(state, 0, self.k)
        state = lax.scan(lambda s, b: (block(s, b, self.k), None), state,
                         jnp.arange(full))[0]
        return block(state, full, rest) if rest else state

    def backward(self, block, state):
        """``block(state, b, n) -> state`` over the blocks, last to first."""
        full, rest = divmod(self.length, self.k)
        if full == 1 and not rest:
            return block(state, 0, self.k)
        if rest:
            state = block(state, full, rest)
        return lax.scan(lambda s, b: (block(s, b, self.k), None), state, jnp.arange(full),
                        reverse=True)[0]

    def start(self, init, starts, b):
        """The carry at block ``b``'s start: ``init`` for the first, else its row of
        ``starts`` (``run_blocks``)."""
        if isinstance(b, int):
            return list(init) if b == 0 else [s[b - 1] for s in starts]
        return [jnp.where(b == 0, i, lax.dynamic_index_in_dim(s, jnp.maximum(b - 1, 0),
                                                               keepdims=False))
                for i, s in zip(init, starts)]


def y_avals(body, ncar):
    return [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in body.outvars[ncar:]]


def run_blocks(step_fn, blocks: Blocks, consts, init, xs, y_avals):
    """The loop run block by block: ``(carry, ys, starts)``, ``starts`` the carry at
    the start of every block but the first (whose start is ``init``), stacked."""
    ys0 = [jnp.zeros((blocks.length, *a.shape), a.dtype) for a in y_avals]
    last = blocks.count - 1
    starts0 = [jnp.zeros((last, *jnp.shape(c)), jnp.result_type(c)) for c in init]

    def block(state, b, n):
        def one(j, st):
            carry, ys = st
            i = blocks.row(b, j)
            carry, y = step_fn(consts, carry, row(xs, i))
            return carry, put_row(ys, y, i)

        carry, ys, starts = state
        carry, ys = lax.fori_loop(0, n, one, (carry, ys))
        if isinstance(b, int):  # the short last block
            return carry, ys, starts
        # the end of every block but the last is the next one's start
        i = jnp.minimum(b, last - 1)
        starts = [lax.dynamic_update_index_in_dim(s, jnp.where(
            b < last, c, lax.dynamic_index_in_dim(s, i, keepdims=False)), i, 0)
            for s, c in zip(starts, carry)]
        return carry, ys, starts

    return blocks.forward(block, (list(init), ys0, starts0))


def row(arrays, i):
    return [lax.dynamic_index_in_dim(a, i, keepdims=False) for a in arrays]


def put_row(arrays, values, i):
    return [lax.dynamic_update_index_in_dim(a, v, i, 0) for a, v in zip(arrays, values)]


def floats(vals) -> list[int]:
    return [i for i, v in enumerate(vals) if is_float(jax.typeof(v))]


def block_vjps(step_fn, blocks: Blocks, consts, xs, g_ys, b, n, g, g_xs, input_of, s0):
    """The vjps of block ``b``'s ``n`` steps, last to first, each at its input
    ``input_of(j, x, s) -> (input, s)`` (``s``: the caller's state, from ``s0``).
    Returns the cotangent at the block's start, the block's float consts cotangents,
    ``g_xs`` (the float ``xs`` cotangents) with the block's rows written, and ``s``."""
    fc, fx = floats(consts), floats(xs)

    def back(jj, st):
        g, gc, g_xs, s = st
        j = n - 1 - jj
        i = blocks.row(b, j)
        x = row(xs, i)
        carry_in, s = input_of(j, x, s)

        def step_vjp(cf, c, xf):
            return step_fn(put(consts, fc, cf), c, put(x, fx, xf))

        _, vjp = jax.vjp(step_vjp, [consts[m] for m in fc], carry_in, [x[m] for m in fx])
        dc, g, dx = vjp((g, row(g_ys, i)))
        return g, [a + d for a, d in zip(gc, dc)], put_row(g_xs, dx, i), s

    gc0 = [jnp.zeros_like(consts[m]) for m in fc]
    return lax.fori_loop(0, n, back, (list(g), gc0, g_xs, s0))


def exact_block(step_fn, blocks: Blocks, consts, xs, g_ys, b, n, start, g, g_xs):
    """Reverse mode over block ``b`` (``n`` steps) from its stored ``start``: the block
    run forwards once more keeping the inputs of its steps after the first, then each
    step's vjp (``block_vjps``'s results but its state)."""
    inputs0 = [jnp.zeros((n - 1, *jnp.shape(c)), jnp.result_type(c)) for c in start]

    def rebuild(j, st):  # step j's output: step j + 1's input
        carry, inputs = st
        carry = step_fn(consts, carry, row(xs, blocks.row(b, j)))[0]
        return carry, put_row(inputs, carry, j)

    if n > 1:
        _, inputs = lax.fori_loop(0, n - 1, rebuild, (list(start), inputs0))

    def input_of(j, x, s):
        if n == 1:
            return list(start), s
        later = row(inputs, jnp.maximum(j - 1, 0))
        return [jnp.where(j == 0, a, c) for a, c in zip(start, later)], s

    return block_vjps(step_fn, blocks, consts, xs, g_ys, b, n, g, g_xs, input_of, ())[:3]


def spread(vals, positions, cts):
    """Cotangents of ``vals``: ``cts`` at the float ``positions``, zeros elsewhere."""
    out = [ct_zero(v) for v in vals]
    for i, c in zip(positions, cts):
        out[i] = c
    return out


def of_inputs(run, nc: int, ncar: int):
    """``run(consts, init, xs)`` as a function of a scan node's inputs, flat outputs."""
    return lambda args: flat(run(list(args[:nc]), list(args[nc:nc + ncar]),
                                  list(args[nc + ncar:])))


def most(drifts):
    """The largest of the drifts (a zero of the drift's dtype for none)."""
    zero = jnp.zeros((), jnp.promote_types(jnp.float32, jnp.result_type(float)))
    return jnp.max(jnp.stack([zero, *[d.astype(zero.dtype) for d in drifts]]))


def put(vals, positions, new):
    out = list(vals)
    for i, v in zip(positions, new):
        out[i] = v
    return out


def flat(pair):
    carry, ys = pair
    return [*carry, *ys]
