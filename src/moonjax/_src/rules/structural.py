"""Bijective moves: the vijp applies the same move to the cotangent.

``reshape``, ``transpose``, ``rev``, ``squeeze``, a ``broadcast_in_dim`` that only
adds unit axes, ``split`` and ``concatenate`` only rearrange entries, so their
Jacobians are permutations and ``vijp`` moves ``g`` exactly as the primal moved ``x``.
(Slices that together partition a value are handled by the sweep as one group.)
"""

from __future__ import annotations

import math

import jax
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


# -- permutations by ``gather`` ---------------------------------------------------------
#
# ``x[:, perm]``, ``x[..., perm]`` and ``jnp.take(x, perm, axis)`` with an integer array
# ``perm`` that the program holds are one ``gather`` whose indices have shape ``(n, 1)``
# and pick whole slices along one axis of size ``n``, in place. If ``perm`` is a
# permutation, the Jacobian is the permutation matrix ``P`` and ``vijp(g) = g P⁻ᵀ``:
# the same gather applied to ``g`` (``y[j] = x[perm[j]]`` and ``g_x[perm[j]] = g_y[j]``).
# Whether ``perm`` is a permutation is only known at run time: it is checked there.


def permutation_axis(node):
    """The axis that ``gather`` ``node`` permutes in place, or a reason it does not."""
    x, idx, y = node.inputs[0].aval, node.inputs[1].aval, node.outputs[0].aval
    dn = node.params["dimension_numbers"]
    if len(dn.start_index_map) != 1 or tuple(dn.collapsed_slice_dims) != tuple(
            dn.start_index_map):
        return None, "`gather` picks along several axes"
    (axis,) = dn.start_index_map
    if dn.operand_batching_dims or dn.start_indices_batching_dims:
        return None, "`gather` with batching dimensions"
    n = x.shape[axis]
    rest = tuple(d for d in range(len(x.shape)) if d != axis)
    if (tuple(idx.shape) != (n, 1) or y.shape != x.shape
            or tuple(dn.offset_dims) != rest
            or tuple(node.params["slice_sizes"]) != tuple(
                1 if d == axis else x.shape[d] for d in range(len(x.shape)))):
        return None, (f"`gather` from shape {x.shape} to {y.shape} with indices of shape "
                      f"{tuple(idx.shape)} is not a permutation of one axis in place "
                      "(repeated, dropped or added entries leave a cokernel)")
    return axis, None


def is_permutation(perm, n):
    """A boolean scalar: ``perm`` (integers) holds each of ``0..n-1`` once."""
    return jnp.all(jnp.sort(perm) == jnp.arange(n, dtype=perm.dtype))


def checked_permutation(node, perm, n, x):
    """``x`` where ``perm`` is a permutation, else NaN; with ``debug`` (the sweep's
    flag) a ``NotPermutationError`` naming the user's line."""
    from moonjax._src.errors import NOT_PERMUTATION, where
    from moonjax._src.rules import DEBUG

    ok = is_permutation(perm, n)
    if DEBUG.get():
        msg = (f"{NOT_PERMUTATION}: `gather` at {where(node.source_info)} reads entries "
               "by an index array that repeats or skips some, so moonjax cannot invert it; "
               "pass a permutation of the axis (e.g. from jax.random.permutation), or "
               "gather outside the differentiated network")

        def check(ok_):
            if not bool(ok_):
                raise FloatingPointError(msg)

        jax.debug.callback(check, ok)
    return jnp.where(ok, x, jnp.asarray(jnp.nan, x.dtype))


def _gather_check(node, positions):
    if positions != [0]:
        return "`gather` reads a spine value as its indices"
    return permutation_axis(node)[1]


def _gather_vijp(node, positions, g_ins, invals):
    axis, _ = permutation_axis(node)
    indices = invals[1]
    g = g_ins[0]
    g_y = lax.gather(g, indices, **{**node.params, "fill_value": None})
    return [checked_permutation(node, indices[:, 0], g.shape[axis], g_y)]


vijp_rules[lax.gather_p] = VijpRule(_gather_vijp, _gather_check)
