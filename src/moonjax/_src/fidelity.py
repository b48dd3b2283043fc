"""``moonjax.fidelity``: how far the sweep's gradient is from an exact one, layer by layer.

The sweep is exact in exact arithmetic, but a cotangent carried forward through inverse
Jacobians picks up rounding error layer by layer (see the float32 fidelity guide).
``fidelity(loss, *args)`` runs ``moonwalk_grad`` and ``jax.grad`` on the same inputs and,
when ``jax_enable_x64`` is on, ``jax.grad`` in float64 as the reference, and reports the
relative error of every parameter leaf and, for parameters stacked over the layers of a
``lax.scan``, of every layer: where the error grows along the depth, the model is
ill-conditioned for the sweep and wants anchors (``anchor_every``).

It runs backprop, so call it on a small batch, not inside the training step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moonjax._src import drift as D

__all__ = ["FidelityReport", "fidelity"]


@dataclasses.dataclass(frozen=True)
class FidelityReport:
    """The result of ``fidelity``. Errors are relative 2-norm errors.

    Attributes:
      reference: ``"float64"`` (``jax.grad`` on the inputs cast to float64) or
        ``"backprop"`` (``jax.grad`` in the inputs' own precision, when x64 is off).
      error: Moonwalk's error over the whole gradient.
      backprop_error: ``jax.grad``'s error in the inputs' precision (``None`` when
        the reference is backprop itself).
      leaves: per parameter leaf (its path), ``(moonwalk error, backprop error)``.
      layers: for leaves stacked over the layers of a top-level ``lax.scan``, Moonwalk's
        error at each layer (an array over the leading axis).
      options: the ``moonwalk_grad`` options that were checked.
      drifts: the sweep's self-check, per place it met an exact cotangent (the loss
        head, an anchor, a recorded fragment): ``description -> drift``. The call
        itself raises ``moonjax.DriftError`` when one exceeds ``drift_tol``;
        ``fidelity`` reports instead (its gradient is the unchecked one).
      drift_tol: the tolerance those drifts are held to.
      amplifiers: the swept steps that can amplify rounding (solves with a weight,
        divisions by a derivative), with their source lines.
      recomputed: where the default's reversible backprop checks its rebuilt inputs
        (a loop's stored carries, a run's kept spines): ``description -> (blocks
        recomputed exactly, blocks checked)``. A block whose rebuilt input drifted
        beyond 16 units of rounding is differentiated again by reverse mode from the
        kept value instead of refusing the call; this counts how often.
    """

    reference: str
    error: float
    backprop_error: float | None
    leaves: dict[str, tuple[float, float | None]]
    layers: dict[str, np.ndarray]
    options: dict[str, Any]
    eps: float = float(np.finfo(np.float32).eps)
    drifts: dict[str, float] = dataclasses.field(default_factory=dict)
    drift_tol: float = float("inf")
    amplifiers: tuple[str, ...] = ()
    recomputed: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)

    @property
    def drift(self) -> float:
        """The largest drift (0 when the sweep met no exact cotangent)."""
        return max(self.drifts.values(), default=0.0)

    @property
    def ratio(self) -> float:
        """Moonwalk's error over backprop's (``error`` itself against backprop)."""
        if self.backprop_error is None:
            return self.error
        if self.backprop_error == 0.0:
            return 1.0 if self.error == 0.0 else float("inf")
        return self.error / self.backprop_error

    def ok(self, factor: float = 10.0, floor: float = 1e-12) -> bool:
        """Whether Moonwalk's error is within ``factor`` × backprop's (or below ``floor``)."""
        if not np.isfinite(self.error):
            return False
        if self.error <= floor:
            return True
        if self.backprop_error is None:  # against backprop itself: backprop's own
            # error is typically a few eps, so 10 eps stands in for it
            return self.error <= factor * 10 * self.eps
        return self.error <= factor * max(self.backprop_error, floor)

    def __str__(self) -> str:
        head = (f"moonjax fidelity ({_options(self.options)}; reference: jax.grad in "
                f"{self.reference})")
        lines = [head, f"  whole gradient: moonwalk {self.error:.1e}"
                 + ("" if self.backprop_error is None
                    else f", backprop {self.backprop_error:.1e} ({self.ratio:.1f}x)")]
        width = max((len(p) for p in self.leaves), default=0)
        for path, (err, bp) in self.leaves.items():
            bp_text = "" if bp is None else f"  backprop {bp:.1e}"
            lines.append(f"  {path:<{width}}  moonwalk {err:.1e}{bp_text}")
            if path in self.layers:
                per = self.layers[path]
                worst = int(np.nanargmax(np.where(np.isfinite(per), per, np.inf)))
                lines.append(f"  {'':<{width}}  per layer: first {per[0]:.1e}, last "
                             f"{per[-1]:.1e}, worst {per[worst]:.1e} at layer {worst}")
        if self.drifts:
            verdict = "within" if self.drift <= self.drift_tol else "BEYOND"
            lines.append(f"  drift (the sweep's self-check, {verdict} the tolerance "
                         f"{self.drift_tol:.1e}):")
            for where_, d in self.drifts.items():
                lines.append(f"    {d:.1e}  {where_}")
            if self.amplifiers:
                lines.append("  steps that can amplify rounding: " + "; ".join(self.amplifiers))
        if self.recomputed:
            lines.append("  blocks of reversible backprop recomputed exactly (their rebuilt input "
                         "drifted beyond 16 units of rounding):")
            for where_, (done, seen) in self.recomputed.items():
                lines.append(f"    {done} of {seen}  {where_}")
        if not self.ok():
            lines.append(
                "  ill-conditioned for the sweep: the error grows with depth. Use "
                "anchor_every=1 (or a small int), volume-preserving layers (additive "
                "couplings), or jax.grad for this network; see the float32 fidelity guide")
        return "\n".join(lines)


def _options(options) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"


def _rel(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    den = float(np.sqrt(np.sum(b * b)))
    num = float(np.sqrt(np.sum((a - b) ** 2)))
    return num / den if den > 0 else num


def _scan_lengths(loss, args) -> set[int]:
    """Lengths of the top-level loops of ``loss`` (their stacked parameters)."""
    jaxpr = jax.make_jaxpr(loss)(*args)
    lengths = set()

    def visit(eqns):
        for eqn in eqns:
            if eqn.primitive is lax.scan_p:
                lengths.add(eqn.params["length"])
            elif eqn.primitive.name in ("jit", "pjit", "closed_call"):
                visit(eqn.params["jaxpr"].jaxpr.eqns)

    visit(jaxpr.jaxpr.eqns)
    return lengths


def _to64(tree):
    def cast(x):
        if isinstance(x, (jax.Array, np.ndarray)) and jnp.issubdtype(x.dtype, jnp.floating):
            return jnp.asarray(x, jnp.float64)
        return x

    return jax.tree_util.tree_map(cast, tree)


def fidelity(
    loss: Callable,
    *args: Any,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    **options: Any,
) -> FidelityReport:
    """Compare ``moonwalk_grad(loss, argnums, **options)`` with an exact gradient.

    The reference is ``jax.grad`` on the inputs cast to float64 when
    ``jax_enable_x64`` is on and the gradients are not float64 already (then backprop
    in the inputs' own precision is reported next to Moonwalk, as the error to
    expect), else ``jax.grad`` in the inputs' precision. Per-layer errors are given
    for parameters whose leading axis is the length of a top-level ``lax.scan``
    (stacked layers).

    Args:
      loss: the loss, as given to ``moonwalk_grad``.
      *args: its arguments (a small batch: backprop runs too).
      argnums: as in ``moonwalk_grad``.
      has_aux: as in ``moonwalk_grad``.
      **options: other ``moonwalk_grad`` options (``mode``, ``anchor_every``,
        ``stream_argnums``, ``fragments``).

    Returns:
      A ``FidelityReport``; ``print`` it, or test ``report.ok()``.

    Example:
      >>> import jax.numpy as jnp, moonjax
      >>> def loss(w, x):
      ...     return jnp.sum(jnp.tanh(x @ w) ** 2)
      >>> report = moonjax.fidelity(loss, jnp.eye(3) + 0.1, jnp.ones((2, 3)))
      >>> report.ok()
      True
    """
    from moonjax._src.api import moonwalk_value_and_grad

    with D.counting_recomputes() as again:
        got, found, amplifiers, tol = moonwalk_value_and_grad(
            loss, argnums, has_aux, **options).drifts(*args)
    recomputed: dict[str, tuple[int, int]] = {}
    for meeting, count, total in again:  # summed over the calls at each place
        key = meeting.describe()
        done, seen = recomputed.get(key, (0, 0))
        recomputed[key] = (done + int(count), seen + total)
    drifts: dict[str, float] = {}
    for meeting, d in found:  # the worst drift at each place
        key = meeting.describe()
        drifts[key] = max(drifts.get(key, 0.0), d) if np.isfinite(d) else float("inf")
    backprop = jax.grad(loss, argnums, has_aux=has_aux)(*args)
    if has_aux:
        backprop = backprop[0]
    low = any(jnp.result_type(g) != jnp.float64 for g in jax.tree_util.tree_leaves(got))
    if jax.config.jax_enable_x64 and low:
        reference = "float64"
        exact = jax.grad(loss, argnums, has_aux=has_aux)(*_to64(args))
        if has_aux:
            exact = exact[0]
    else:
        reference, exact, backprop = "backprop", backprop, None

    lengths = _scan_lengths(loss, args)
    paths = [jax.tree_util.keystr(p) or "grad"
             for p, _ in jax.tree_util.tree_flatten_with_path(exact)[0]]
    got_l = jax.tree_util.tree_leaves(got)
    exact_l = jax.tree_util.tree_leaves(exact)
    bp_l = jax.tree_util.tree_leaves(backprop) if backprop is not None else [None] * len(
        exact_l)
    leaves, layers = {}, {}
    for path, g, e, b in zip(paths, got_l, exact_l, bp_l, strict=True):
        leaves[path] = (_rel(g, e), None if b is None else _rel(b, e))
        if np.ndim(e) >= 1 and np.shape(e)[0] in lengths and np.shape(e)[0] > 1:
            layers[path] = np.array([_rel(g[i], e[i]) for i in range(np.shape(e)[0])])
    whole = lambda tree: np.concatenate(
        [np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(tree)])
    return FidelityReport(
        reference=reference,
        error=_rel(whole(got), whole(exact)),
        backprop_error=None if backprop is None else _rel(whole(backprop), whole(exact)),
        leaves=leaves, layers=layers, options=dict(options),
        eps=float(jnp.finfo(jnp.result_type(*[g.dtype for g in got_l])).eps),
        drifts=drifts, drift_tol=tol, amplifiers=tuple(amplifiers), recomputed=recomputed)
