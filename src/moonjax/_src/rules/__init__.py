"""The vijp rule registry: one table keyed by JAX primitive.

Three families of rules live here, one file each:

* ``elementwise`` — elementwise primitives. They are not inverted one by one: the
  sweep groups a connected region of them with a single spine input into one
  elementwise map ``φ`` and uses ``vijp = g / φ'(a)``. Their entry in
  ``elementwise_rules`` only says whether the primitive keeps ``φ`` injective.
* ``structural`` — bijective moves (reshape, transpose, split, concatenate, …).
* ``linear`` — ``dot_general`` with a square or full-rank weight; ``factors`` finds the
  triangular and permutation factors a weight is built from, and solves with them.

A rule of ``vijp_rules`` is a ``VijpRule``; users add their own with
``register_vijp``.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

# elementwise primitive -> check(node, region_flags) -> None (fine) or a reason string
elementwise_rules: dict[Any, Callable] = {}

# primitive -> VijpRule
vijp_rules: dict[Any, VijpRule] = {}

# ``debug=True`` of the sweep running now: rules with a run-time check (a permutation
# ``gather``) then raise at the user's line instead of returning NaN.
DEBUG: contextvars.ContextVar[bool] = contextvars.ContextVar("moonjax_debug", default=False)


@dataclasses.dataclass(frozen=True)
class VijpRule:
    """How the sweep crosses one primitive.

    Attributes:
      vijp: ``vijp(node, positions, g_ins, invals) -> list of output cotangents``:
        given the known cotangents ``g_ins`` of the inputs at ``positions`` (the
        spine operands) and all primal inputs, return the unique cotangents of the
        outputs. ``None`` for an output means "no cotangent" (non-float output).
      check: ``check(node, positions) -> None | str``: a static test that the
        primitive is submersive in the spine operands; the string says why not.
      merge: ``True`` when every stream operand is a spine operand (``concatenate``):
        the sweep then waits until all of them are known.
      spine_arity: for blocks with a hand-written vijp, the number of leading operands
        that form the spine.
      solves: ``True`` when the vijp solves with its non-spine operands (a weight): the
        sweep passes each of them as a ``factors.Weight``, which solves through the
        factors the program builds the weight from, or through one factorisation per
        weight per sweep.
    """

    vijp: Callable
    check: Callable | None = None
    merge: bool = False
    spine_arity: int | None = None
    solves: bool = False


def ct_dtype(dtype):
    """The dtype a swept cotangent is kept in: float32 for 16-bit floats (bfloat16,
    float16), so error does not grow at their precision layer by layer; else ``dtype``."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
        return jnp.dtype(jnp.float32)
    return dtype


def register_vijp(primitive: Any, rule: Callable, *, check: Callable | None = None
                  ) -> None:
    """Register a vijp rule for a primitive with one spine operand.

    ``rule(g, *primals, argnum, **params)`` gets the known cotangent ``g`` of input
    ``argnum`` and returns the unique cotangent of the (single) output ``y`` such that
    ``vjp(prim)(y_ct)[argnum] == g``. ``check(argnum, *avals, **params)`` may return a
    string saying why the primitive is not submersive for those operands.

    Args:
      primitive: the JAX primitive (``jax.extend.core.Primitive``) the rule is for.
      rule: ``rule(g, *primals, argnum, **params) -> g_out``, or a ready ``VijpRule``.
      check: optional ``check(argnum, *avals, **params) -> str | None``: why the
        primitive is not submersive for these operands (the sweep then records a
        fragment, or raises with ``fragments=False``), ``None`` when it is.

    Returns:
      None; the rule replaces any earlier one for ``primitive``.

    Example:
      >>> import moonjax
      >>> from jax.extend.core import Primitive
      >>> scale_p = Primitive("my_scale")  # y = x * s, s a nonzero scalar
      >>> moonjax.register_vijp(scale_p, lambda g, x, s, *, argnum, **params: g / s)
    """
    if isinstance(rule, VijpRule):
        vijp_rules[primitive] = rule
        return

    def vijp(node, positions, g_ins, invals):
        (pos,) = positions
        out = rule(g_ins[0], *invals, argnum=pos, **node.params)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def static_check(node, positions):
        if check is None:
            return None
        (pos,) = positions
        return check(pos, *[a.aval for a in node.inputs], **node.params)

    vijp_rules[primitive] = VijpRule(vijp, static_check)


def _load_builtin_rules() -> None:
    from moonjax._src.rules import elementwise, linear, structural  # noqa: F401


_load_builtin_rules()
