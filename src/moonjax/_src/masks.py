"""Sign masks, bit-packed: what mixed phase 1 keeps of a piecewise-linear activation.

The input cotangent of ``select_n(p, a, b)`` (leaky-ReLU is ``select_n(x >= 0, s x, x)``)
needs only the predicate ``p``. JAX's own reverse mode keeps it as a ``bool`` array, a
byte an entry; ``select`` keeps it packed, 32 entries to a ``uint32``, so a leaky-ReLU
layer costs phase 1 one bit per activation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BITS = 32
_SHIFTS = np.arange(BITS, dtype=np.uint32)


def pack(pred: jax.Array) -> jax.Array:
    """A ``bool`` array as ``ceil(size / 32)`` ``uint32`` words (entry ``i`` is bit
    ``i % 32`` of word ``i // 32``)."""
    flat = pred.reshape(-1)
    pad = -flat.size % BITS
    words = jnp.pad(flat, (0, pad)).reshape(-1, BITS).astype(jnp.uint32)
    return jnp.sum(words << _SHIFTS, axis=1, dtype=jnp.uint32)


def unpack(words: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """The inverse of ``pack``: the ``bool`` array of ``shape``."""
    bits = (words[:, None] >> _SHIFTS) & jnp.uint32(1)
    return bits.reshape(-1)[:math.prod(shape)].reshape(shape).astype(jnp.bool_)


def packable(pred_aval, case_avals) -> bool:
    """Whether ``select_n`` with these operands is worth packing: a ``bool`` predicate
    of the cases' shape, at least one word long, and float cases."""
    return (pred_aval.dtype == jnp.bool_ and pred_aval.size >= BITS
            and all(a.shape == pred_aval.shape for a in case_avals)
            and all(jnp.issubdtype(a.dtype, jnp.inexact) for a in case_avals))


@jax.custom_vjp
def select(pred, *cases):
    """``lax.select_n(pred, *cases)`` for a ``bool`` ``pred``; its vjp keeps ``pred``
    bit-packed."""
    return lax.select_n(pred, *cases)


def _select_fwd(pred, *cases):
    return lax.select_n(pred, *cases), pack(pred)


def _select_bwd(words, g):
    pred = unpack(words, g.shape)
    zero = jnp.zeros_like(g)
    false_ct = lax.select_n(pred, g, zero)
    true_ct = lax.select_n(pred, zero, g)
    return (None, false_ct, true_ct)


select.defvjp(_select_fwd, _select_bwd)
