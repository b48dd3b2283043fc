"""The sweep's self-check: drift where it meets an exact cotangent.

The sweep solves ``g_i = g_{i-1} J_i^{-1}`` layer after layer, so its rounding can grow
by up to ``‖J_i^{-1}‖`` per layer. Wherever it meets a cotangent it did not sweep — the
loss head (differentiated in reverse mode), an anchor or a fragment that phase 1
recorded — the difference between the two is a measurement of that growth:

.. math::

   \\text{drift} = \\frac{\\lVert \\hat g - g \\rVert}{\\lVert g \\rVert}

with ``ĝ`` the swept and ``g`` the exact cotangent. Every call computes it (a few
reductions of values the sweep already holds); ``guard`` turns a drift beyond the
tolerance into an error at run time or NaN gradients, never a silently wrong result.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moonjax._src.errors import BATCH_MIXED, DRIFT_MARKER, NON_FINITE


class _QuietChecks(logging.Filter):
    """JAX logs every exception a host callback raises, with its traceback; moonjax's
    checks raise on purpose and their message reaches the caller, so those records
    are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or not any(m in str(exc) for m in (DRIFT_MARKER, NON_FINITE,
                                                              BATCH_MIXED))


for _name in ("jax._src.callback", "jax._src.debugging"):
    logging.getLogger(_name).addFilter(_QuietChecks())


@dataclasses.dataclass(frozen=True)
class Meeting:
    """Where the sweep met an exact cotangent (static: part of the error message)."""

    what: str  # "the loss head", "an anchor", "a recorded fragment", ...
    where: str  # the user's file:line
    loop: str = ""  # the enclosing lax.scan's file:line, if any
    measured: str = "the sweep's cotangent"  # what drifted from its exact value

    def describe(self) -> str:
        inside = f" (inside the loop at {self.loop})" if self.loop else ""
        return f"{self.what} at {self.where}{inside}"


# While the sweep runs: the (Meeting, drift) pairs it measured and the steps that can
# amplify rounding (a solve with a weight, a division by a derivative), for the message.
_MEETINGS: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "moonjax_meetings", default=None)
_AMPLIFIERS: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "moonjax_amplifiers", default=None)


@contextlib.contextmanager
def measuring():
    """Collect the drifts and amplifying steps of the sweeps run inside the block."""
    meetings, amplifiers = [], []
    t1, t2 = _MEETINGS.set(meetings), _AMPLIFIERS.set(amplifiers)
    try:
        yield meetings, amplifiers
    finally:
        _MEETINGS.reset(t1)
        _AMPLIFIERS.reset(t2)


def relative(swept, exact, floor=None):
    """``‖swept - exact‖ / ‖exact‖`` as a float32 (float64 under x64) scalar; NaN or
    Inf in ``swept`` give a non-finite drift. Scaled by ``max|exact|`` against overflow.
    ``floor``: a norm (``norm``) the denominator is at least (a log-determinant
    accumulator starts at zero: its error is measured against what it grows to)."""
    dtype = jnp.promote_types(jnp.result_type(exact), jnp.float32)
    swept, exact = jnp.asarray(swept, dtype), jnp.asarray(exact, dtype)
    scale = jnp.max(jnp.abs(exact))
    scale = jnp.where(scale > 0, scale, 1)
    num = jnp.sqrt(jnp.sum(jnp.square((swept - exact) / scale)))
    den = jnp.sqrt(jnp.sum(jnp.square(exact / scale)))
    if floor is not None:
        den = jnp.maximum(den, jnp.asarray(floor, dtype) / scale)
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1), jnp.where(num > 0, jnp.inf, 0))


def norm(x):
    """``‖x‖`` in float32 (float64 under x64), scaled against overflow."""
    x = jnp.asarray(x, jnp.promote_types(jnp.result_type(x), jnp.float32))
    scale = jnp.max(jnp.abs(x))
    scale = jnp.where(scale > 0, scale, 1)
    return scale * jnp.sqrt(jnp.sum(jnp.square(x / scale)))


def note(meeting: Meeting, swept, exact) -> None:
    """Record the drift between a swept and an exact cotangent (no-op outside
    ``measuring``, and for the pieces without a float cotangent)."""
    meetings = _MEETINGS.get()
    if meetings is None or swept is None or exact is None:
        return
    if not jnp.issubdtype(jnp.result_type(exact), jnp.inexact):
        return
    meetings.append((meeting, relative(swept, exact)))


def note_value(meeting: Meeting, drift) -> None:
    """Record an already measured drift (a loop's maximum over its steps)."""
    meetings = _MEETINGS.get()
    if meetings is not None:
        meetings.append((meeting, drift))


def amplifier(description: str) -> None:
    """Record a swept step that can amplify rounding (for the error message)."""
    amplifiers = _AMPLIFIERS.get()
    if amplifiers is not None and description not in amplifiers:
        amplifiers.append(description)


def tolerance(dtype) -> float:
    """The default drift tolerance for a network input of ``dtype``: float32
    ``ULPS_32`` eps (1.5e-5), float64 ``FLOAT64`` (1e-9), 16-bit ``ULPS_16`` of their
    own eps (see the measurements below)."""
    dtype = np.dtype(dtype)
    if dtype.itemsize < 4:
        return float(ULPS_16 * np.finfo(dtype).eps)
    if dtype.itemsize == 4:
        return float(ULPS_32 * np.finfo(dtype).eps)
    return FLOAT64


# The default tolerances. float32: ULPS_32 units of epsilon (1.5e-5). Measured (the
# table in docs/fidelity.md): accurate sweeps — additive RevNets and reversible
# transformers to depth 256, anchored leaky-ReLU MLPs to depth 512 — drift at most
# 16 eps with gradients within 2.1x of backprop's error, and the digits RevNet drifts up
# to 70 eps while it trains; default-initialised dense MLPs drift 150 eps and more
# (gradients 80x to 1e20x backprop's error). float64: 1e-9, the digits float64 users
# compare gradients at. 16-bit inputs: ULPS_16 units of their own epsilon
# (bfloat16: 0.5): their forward values carry 16-bit rounding into the sweep.
ULPS_32 = 128
FLOAT64 = 1e-9
ULPS_16 = 64


def guard(result, drifts: list, amplifiers: list, tol: float, on_drift: str, hint: str = "",
          loss=None):
    """Return ``result`` (a pytree of gradients) if every drift is within ``tol``;
    otherwise raise at run time (``on_drift="raise"``, through a host callback, so it
    works under ``jax.jit``) or make every gradient NaN (``on_drift="nan"``). A
    non-finite ``loss`` (the forward pass overflowed) is said as such."""
    if not drifts:
        return result
    values = lax.stop_gradient(jnp.stack([jnp.asarray(d, jnp.float32) for _, d in drifts]))
    if on_drift == "nan":
        ok = jnp.all(values <= tol)
        return jax.tree_util.tree_map(
            lambda g: jnp.where(ok, g, jnp.asarray(jnp.nan, g.dtype))
            if jnp.issubdtype(g.dtype, jnp.inexact) else g, result)
    meetings = [m for m, _ in drifts]

    def check(vals, loss):
        vals = np.asarray(vals)
        if not (vals <= tol).all():
            if not np.isfinite(loss):
                raise FloatingPointError(
                    f"{DRIFT_MARKER}: the loss is {float(loss)}: the forward pass itself "
                    "overflowed or divided by zero, so no gradient of it is accurate "
                    "(jax.grad's would not be finite either). Check the inputs' scale and "
                    "the initialisation (a deep flow or residual stack at its default "
                    "init can overflow), or compute in float64.")
            raise FloatingPointError(message(vals.reshape(-1, len(meetings)), meetings,
                                             amplifiers, tol, hint))

    # an effect: never pruned, and a raise fails the whole computation, so its results
    # are never seen; the gradients themselves are untouched (no copy, no extra memory)
    loss = jnp.zeros((), jnp.float32) if loss is None else lax.stop_gradient(
        jnp.asarray(loss).astype(jnp.float32))
    jax.debug.callback(check, values, loss)
    return result


def message(vals, meetings, amplifiers, tol, hint: str = "") -> str:
    """The error's text: where, how much, why, what to do."""
    per = np.nanmax(np.where(np.isnan(vals), np.inf, vals), axis=0)
    k = int(np.argmax(per))
    worst_at, measured = meetings[k].describe(), meetings[k].measured
    steps = "; ".join(amplifiers[:3]) + (f"; and {len(amplifiers) - 3} more"
                                         if len(amplifiers) > 3 else "")
    why = (f" The swept steps that can amplify rounding: {steps}." if steps else "")
    drift = "non-finite" if not math.isfinite(per[k]) else f"{per[k]:.3g}"
    return (
        f"{DRIFT_MARKER}: {measured} drifted {drift} (relative) from the exact "
        f"one at {worst_at}; the tolerance is {tol:.3g}, so the gradient would not be "
        f"accurate.{why}{hint} Solving with an ill-conditioned weight or dividing by a small "
        "derivative (leaky_relu's slope, a saturated tanh) amplifies rounding at every "
        "layer it crosses. Fix: anchor the loop more often (anchor_every=2, or 1: accurate at "
        "backprop's memory or more), build the "
        "layers from volume-preserving blocks (additive couplings, moonjax.nn), compute "
        "in float64, or use jax.grad for this network; drift_tol=... sets the tolerance "
        "and on_drift='nan' returns NaN gradients instead of raising.")


# What the message adds for a mode whose phase 1 can itself lose the digits.
HINTS = {
    ("reversible", "reversible"): (
        " mode='reversible' rebuilds every layer's input by inverting the layer, and where "
        "the inverse divides or solves the rounding grows layer by layer: use the default "
        "mode (Moonwalk, anchored where needed)."),
    ("auto", "reversible"): (
        " The default ran reversible backprop (each loop's steps inverted: additions, "
        "moves, elementwise divisions); anchor_every=4 stores the carry more often, and "
        "mode='mixed' runs Moonwalk's sweep instead."),
    "batch_axis": (" With batch_axis=0 a non-finite drift also means that the examples "
                   "are not independent (phase 1 made the input cotangent NaN): "
                   "debug=True names where they meet, or drop batch_axis."),
}


# While ``moonjax.fidelity`` runs: for each place the default recomputes a drifting block
# exactly instead of refusing it, ``(Meeting, blocks recomputed, blocks checked)``.
_RECOMPUTES: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "moonjax_recomputes", default=None)


@contextlib.contextmanager
def counting_recomputes():
    """Collect the recomputed blocks of the gradients taken inside the block."""
    found: list = []
    token = _RECOMPUTES.set(found)
    try:
        yield found
    finally:
        _RECOMPUTES.reset(token)


def note_recomputes(meeting: Meeting, count, total: int) -> None:
    """Record that ``count`` of the ``total`` blocks checked at ``meeting`` drifted and
    were recomputed exactly."""
    found = _RECOMPUTES.get()
    if found is not None:
        found.append((meeting, count, total))
