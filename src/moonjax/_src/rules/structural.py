"""Bijective moves: the vijp applies the same move to the cotangent.

``reshape``, ``transpose``, ``rev``, ``squeeze``, a ``broadcast_in_dim`` that only
adds unit axes, ``split`` and ``concatenate`` only rearrange entries, so their
Jacobians are permutations and ``vijp`` moves ``g`` exactly as the primal moved ``x``.
(Slices that together partition a value are handled by the sweep as one group.)
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from jax import lax

from moonjax._src.rules import VijpRule, vijp_rules


def _same_move(move):
    """A rule for a one-operand, one-output rearrangement."""

    def vijp(node, positions, g_ins, invals):
        return [move(node, g_ins[0])]

    return VijpRule(vijp)


def _reshape_like_output(node, g):
    return jnp.reshape(g, node.outputs[0].aval.shape)


vijp_rules[lax.reshape_p] = _same_move(_reshape_like_output)
vijp_rules[lax.squeeze_p] = _same_move(_reshape_like_output)
vijp_rules[lax.transpose_p] = _same_move(
    lambda node, g: lax.transpose(g, node.params["permutation"])
)
vijp_rules[lax.rev_p] = _same_move(lambda node, g: lax.rev(g, node.params["dimensions"]))


def _broadcast_check(node, positions):
    x, y = node.inputs[0].aval, node.outputs[0].aval
    if math.prod(x.shape) != math.prod(y.shape):
        return (
            f"`broadcast_in_dim` copies a spine value from shape {x.shape} to {y.shape}: "
            "an expanding map has a cokernel"
        )
    return None


vijp_rules[lax.broadcast_in_dim_p] = VijpRule(
    _same_move(_reshape_like_output).vijp, _broadcast_check
)


def _split_vijp(node, positions, g_ins, invals):
    axis, sizes = node.params["axis"], node.params["sizes"]
    return list(lax.split(g_ins[0], sizes, axis))


vijp_rules[lax.split_p] = VijpRule(_split_vijp)


def _concatenate_check(node, positions):
    if len(positions) != len(node.inputs):
        return (
            "`concatenate` joins a spine value with values that do not depend on the "
            "network input: an expanding map has a cokernel"
        )
    return None


def _concatenate_vijp(node, positions, g_ins, invals):
    return [lax.concatenate(list(g_ins), node.params["dimension"])]


vijp_rules[lax.concatenate_p] = VijpRule(_concatenate_vijp, _concatenate_check, merge=True)


def slice_partition(nodes, aval):
    """If ``nodes`` (all ``slice`` of one value of ``aval``) partition it, the sorted
    ``(axis, [(start, stop, node), ...])``; otherwise ``None``."""
    axis = None
    pieces = []
    for node in nodes:
        p = node.params
        if p.get("strides") not in (None, (1,) * len(aval.shape)):
            return None
        diff = [
            d for d in range(len(aval.shape))
            if (p["start_indices"][d], p["limit_indices"][d]) != (0, aval.shape[d])
        ]
        if len(diff) > 1:
            return None
        d = diff[0] if diff else 0
        if axis is None:
            axis = d
        elif d != axis:
            return None
        pieces.append((p["start_indices"][d], p["limit_indices"][d], node))
    pieces.sort(key=lambda t: t[0])
    pos = 0
    for start, stop, _ in pieces:
        if start != pos:
            return None
        pos = stop
    if pos != aval.shape[axis]:
        return None
    return axis, pieces
