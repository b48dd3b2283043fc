"""The one error hierarchy of moonjax.

Every error moonjax raises on purpose is a ``MoonjaxError``. Errors that come
from an equation of the user's program name the primitive and the user's source
line (JAX keeps ``source_info`` on every equation) and say what to do.
"""

from __future__ import annotations

import os

from jax.extend import source_info_util


class MoonjaxError(Exception):
    """Base class of every error moonjax raises on purpose."""


class UnsupportedPrimitiveError(MoonjaxError, NotImplementedError):
    """A primitive on the spine has no vijp rule."""


class NotSubmersiveError(MoonjaxError):
    """A layer's Jacobian is not surjective, so its vijp is not unique."""


class SpineStructureError(MoonjaxError):
    """The program's data flow cannot be swept forwards (e.g. a value feeds two layers)."""


class LossShapeError(MoonjaxError, TypeError):
    """The differentiated function does not return a real scalar."""


class ArgumentError(MoonjaxError, ValueError):
    """Bad ``argnums``, ``stream_argnums`` or input types."""


class NonFiniteCotangentError(MoonjaxError, FloatingPointError):
    """``debug=True`` found a NaN or Inf in a swept cotangent (e.g. a singular weight)."""


class NotPermutationError(NotSubmersiveError):
    """A ``gather`` on the spine that moonjax crosses as a permutation (``x[:, perm]``,
    ``jnp.take(x, perm, axis)``) got an index array that is not a permutation, so its
    vijp is not unique. Checked at run time: the gradient is NaN, and with
    ``debug=True`` this error names the user's line."""


class DriftError(MoonjaxError, FloatingPointError):
    """The sweep's self-check: its cotangent drifted from an exact one (the loss head,
    an anchor, a recorded fragment) beyond the tolerance, so the gradient would not be
    accurate. Raised at run time; under an outer ``jax.jit`` its message arrives inside
    JAX's ``JaxRuntimeError``."""


# how the drift check's message starts (it travels through a host callback)
DRIFT_MARKER = "moonjax: inaccurate gradient"

# how the ``debug`` check of ``batch_axis`` starts (it travels through a host callback)
BATCH_MIXED = "moonjax: batch_axis=0, but the examples are not independent"

# how the ``debug`` check of a permutation ``gather`` starts (it travels through a host
# callback)
NOT_PERMUTATION = "moonjax: the index array of a gather is not a permutation"

# how the ``debug`` check's message starts (it travels through a host callback)
NON_FINITE = "moonjax: non-finite swept cotangent"


# installed libraries (optax, flax, ...) are not "the user's line", wherever the
# environment lives: JAX only skips its own tree and the standard library
_LIBRARY_DIRS = tuple(os.sep + d + os.sep for d in ("site-packages", "dist-packages"))
_FRAMES = 64  # how far up the stack to look for the user's line


# moonjax's own source: its frames are not the user's line (an editable install is not
# under site-packages)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep


def user_line(source_info) -> str | None:
    """The innermost ``file:line`` of ``source_info`` outside JAX, moonjax and installed
    libraries (else inside moonjax: its own models), relative to the working directory
    where it lies under it; None when there is none."""
    if source_info is None:
        return None
    try:
        lines = source_info_util.summarize(source_info, num_frames=_FRAMES).splitlines()
    except Exception:  # pragma: no cover - defensive: source info is best effort
        return None
    lines = [ln for ln in lines if ln and ln != "unknown"
             and not any(d in ln for d in _LIBRARY_DIRS)]
    for line in reversed(lines):  # innermost last; moonjax's own (its models) if no other
        if not line.startswith(_OWN_DIR):
            return _relative(line)
    return _relative(lines[-1]) if lines else None


def _relative(line: str) -> str:
    """``line`` with the working directory's prefix removed."""
    try:
        here = os.getcwd() + os.sep
    except OSError:  # pragma: no cover - the working directory was removed
        return line
    return line[len(here):] if line.startswith(here) else line


def where(source_info) -> str:
    """The user's ``file:line`` of an equation's source info, or ``<unknown location>``."""
    line = user_line(source_info)
    if line is not None:
        return line
    try:  # only library frames: better one of those than nothing
        return source_info_util.summarize(source_info) or "<unknown location>"
    except Exception:  # pragma: no cover
        return "<unknown location>"


def equation_error(cls, node, what: str, fix: str) -> MoonjaxError:
    """An error of class ``cls`` that names ``node``'s primitive and source line."""
    return cls(
        f"{what}\n  primitive: {node.primitive.name}\n  at: {where(node.source_info)}\n"
        f"  fix: {fix}"
    )


def from_runtime_error(error: Exception) -> MoonjaxError | None:
    """The moonjax error that a run-time check (a host callback that raised: the drift
    check, ``debug``'s checks) left inside a ``jax.errors.JaxRuntimeError``, else None.

    Under ``jax.jit`` such a check surfaces as JAX's runtime error; a training loop
    can turn it back into the moonjax error with its message::

        try:
            state = train_step(state, batch)
        except jax.errors.JaxRuntimeError as e:
            raise (moonjax.from_runtime_error(e) or e) from None

    Args:
      error: the exception a jitted call raised.

    Returns:
      The ``DriftError``, ``NonFiniteCotangentError``, ``ArgumentError`` or
      ``NotPermutationError`` whose message ``error`` carries, or ``None`` when it
      carries none (the error is not moonjax's).

    Example:
      >>> import moonjax
      >>> moonjax.from_runtime_error(RuntimeError("moonjax: inaccurate gradient: ..."))
      DriftError('moonjax: inaccurate gradient: ...')
      >>> moonjax.from_runtime_error(ValueError("something else")) is None
      True
    """
    import re

    for marker, cls in ((DRIFT_MARKER, DriftError), (NON_FINITE, NonFiniteCotangentError),
                        (BATCH_MIXED, ArgumentError), (NOT_PERMUTATION, NotPermutationError)):
        found = re.search(re.escape(marker) + r"[^\n]*", str(error))
        if found is not None:
            return cls(found.group(0))
    return None

