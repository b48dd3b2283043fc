"""Public transforms: ``moonwalk_grad``, ``moonwalk_value_and_grad``, ``vijp``, ``custom_vijp``."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moonjax._src import drift as D
from moonjax._src import graph as G
from moonjax._src.errors import (
    ArgumentError,
    LossShapeError,
    NotSubmersiveError,
    SpineStructureError,
    UnsupportedPrimitiveError,
    from_runtime_error,
)
from moonjax._src.phase1 import (
    AUTO_ANCHOR,
    anchor_plan,
    forward_batched,
    mixed_with_probes,
)
from moonjax._src.phase1 import forward as phase1_forward
from moonjax._src.phase1 import reversible as reversible_backprop
from moonjax._src.plan import CHECKPOINTED, REVERSIBLE, RUNS, analyse
from moonjax._src.rules import VijpRule
from moonjax._src.sweep import REPORT, SHIFTS, Collect, sweep

MODES = ("auto", "mixed", "reversible", "forward")


def _normalize_argnums(argnums, nargs: int, name: str) -> tuple[int, ...]:
    if isinstance(argnums, int):
        argnums = (argnums,)
    if isinstance(argnums, (str, bytes)):
        argnums = None  # iterable, but not of ints
    try:
        argnums = tuple(operator.index(a) for a in argnums)
    except TypeError:
        raise ArgumentError(f"{name} must be an int or a tuple of ints, got {argnums!r}"
                            ) from None
    for a in argnums:
        if not -nargs <= a < nargs:
            raise ArgumentError(
                f"{name}={a} is out of range: the function was called with {nargs} "
                "positional argument(s)")
    return tuple(a % nargs for a in argnums)


def _checked_at_call(run, dynamic):
    """Run, wait for the result, and turn the run-time checks (host callbacks that
    raise: the drift check, ``debug``'s NaN/Inf and ``batch_axis`` checks) into
    ``DriftError``, ``NonFiniteCotangentError`` or ``ArgumentError`` at
    the caller's line. Under an outer ``jax.jit`` nothing waits: the same message
    arrives inside JAX's ``JaxRuntimeError`` when the result is used."""
    try:
        out = run(*dynamic)
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(out)):
            return out
        return jax.block_until_ready(out)
    except jax.errors.JaxRuntimeError as e:
        found = from_runtime_error(e)
        if found is not None:
            raise found from None
        raise


def _no_stream_message(stream_ix, stream_argnums, diff, leaves) -> str:
    if not stream_ix:
        return ("moonwalk_grad needs the network input as a float argument that is not "
                f"differentiated (argnums={diff}); pass the data as an argument or set "
                "stream_argnums")
    def kinds(i):
        names = sorted({str(_dtype(x) or type(x).__name__) for x in leaves[i]})
        return ", ".join(names) or "no arrays"

    found = ", ".join(f"argument {i} ({kinds(i)})" for i in stream_ix)
    fix = ("cast the network input to a float dtype (embed integer tokens inside the loss "
           "and pass the float embeddings, or the float features)")
    if stream_argnums is None:
        fix += ", or name the float network input with stream_argnums"
    return (f"the network input must be a float array, but {found} has no float leaf "
            f"(stream_argnums={stream_argnums!r}, argnums={diff}); {fix}")


def _check_loss(out, has_aux: bool):
    if has_aux:
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise LossShapeError(
                "with has_aux=True the function must return a pair (loss, aux); got "
                f"{type(out).__name__}")
        out = out[0]
    aval = jax.typeof(out)
    shape = getattr(aval, "shape", None)
    dtype = getattr(aval, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise LossShapeError(
            "moonwalk_grad requires a real scalar (shape ()) float output, like jax.grad; "
            f"got shape {shape} and dtype {dtype}. Reduce the loss (e.g. jnp.mean) or use "
            "moonjax.vijp for non-scalar functions.")


def moonwalk_value_and_grad(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    stream_argnums: int | Sequence[int] | None = None,
    mode: str = "auto",
    fragments: bool = True,
    anchor_every: int | str | None = "auto",
    batch_axis: int | None = None,
    drift_tol: float | None = None,
    on_drift: str = "raise",
    debug: bool = False,
) -> Callable:
    """Like ``jax.value_and_grad``, computed by Moonwalk.

    Phase 1 computes the exact cotangent ``g₀ = ∂ℓ/∂x`` of the network input ``x``
    (the *stream*: by default the float leaves of the first positional argument after
    those in ``argnums``, as ``x`` in ``loss(params, x, y)``). Then the inverse-forward
    sweep walks the network forwards,
    ``g_i = vijp_i(h_{i-1}, g_{i-1})``, and pulls each ``g_i`` back to the layer's
    parameters, ``∂ℓ/∂θ_i = g_i ∂f_i/∂θ_i``, without keeping any layer's activations.

    Args:
      fun: the loss, returning a real scalar (or ``(loss, aux)`` with ``has_aux``).
      argnums: which positional argument(s) to differentiate, as in ``jax.grad``.
      has_aux: as in ``jax.grad``.
      stream_argnums: which positional argument(s) hold the network input; by default
        the first argument with a float leaf after those in ``argnums`` (else before
        them). May overlap ``argnums`` to also get the input gradient. Labels and
        masks should stay out of it. Under the default mode a loss with no float
        argument besides the differentiated ones (the input closed over) is
        differentiated in reverse mode.
      mode: the treatment. ``"auto"`` (the default): a static plan of the program
        picks the cheapest exact and stable one (``moonjax.check`` shows it):
        reversible backprop for each ``lax.scan`` over layers that inverts by
        additions and moves (additive couplings, permutations) or elementwise
        divisions (affine couplings), and for each run of unrolled layers (a Python
        loop) that does and would keep less; checkpointed reverse mode (the carry
        stored every ``sqrt(length)`` steps, each block recomputed once) for the other
        loops; plain reverse mode (``jax.grad``'s) for everything else; Moonwalk
        (``"mixed"``) where many layers stand outside the loops. The others force
        one treatment: ``"mixed"``: a reverse pass for
        the input cotangent only, storing what that needs (weights, sign masks), not
        activations, then the sweep. ``"reversible"``: reversible backprop, no sweep:
        each ``lax.scan`` over layers and each run of unrolled layers that inverts
        keeps its output only and, going back, rebuilds every step's input by
        inverting it and takes the step's vjp (the rest of the program is reverse
        mode); the rebuilt input is checked against the true one like a drift.
        ``"forward"``: one JVP
        per entry of the input, storing nothing (time grows with the input size),
        then the sweep.
      fragments: let phase 1 record the exact output cotangent of each spine step that
        is not submersive (ReLU, an expanding dense layer, a primitive without a vijp
        rule) so the sweep can cross it: memory grows with the non-submersive part of
        the network only. ``"mixed"`` records them in its reverse pass, ``"forward"``
        by one more JVP per entry of each; ``"reversible"`` checkpoints instead the
        loops it cannot invert (reverse mode over blocks of about ``sqrt(length)``
        steps, exact). ``False`` raises instead, naming the step.
      anchor_every: in ``"mixed"`` mode, let phase 1 record the exact carry cotangent
        every ``k`` steps of each ``lax.scan`` over layers and restart the sweep there,
        bounding the growth of rounding error to ``k`` layers at the cost of
        ``depth / k`` stored cotangents. ``"auto"`` (the default) anchors every 4 steps
        the loops whose sweep divides by derivatives or solves with weights (leaky-ReLU
        MLPs, affine couplings, LU dense layers), more often after a known small slope
        ``s`` (every ``k`` with ``(1/s)^k <= 100``) and every 2 at most for 16-bit
        inputs, and leaves volume-preserving ones (additive couplings) alone; ``None``
        never anchors. Reversible backprop (``"reversible"``, and the loops the
        default runs so) stores the carry instead and restarts the inversion there:
        ``"auto"`` every 16 steps where the inverse adds, moves or divides elementwise
        (additive and affine couplings), every 4 where it solves or for a 16-bit
        carry; runs of unrolled layers every ``k`` segments with ``k`` near
        ``sqrt(depth x spine / a layer's activations)``, a block whose rebuilt input
        drifts recomputed exactly (reverse mode from the kept spine). ``k`` need not
        divide the loop's length (the last block is shorter).
      batch_axis: in ``"forward"`` mode, ``0`` declares that the examples along axis 0
        of the network input are independent until the loss reduces over them (no
        batch norm, no attention across the batch). Phase 1 then takes one JVP per
        feature instead of one per entry: ``batch`` times fewer. ``2 ⌈log₂ batch⌉`` probe
        JVPs check the claim; if it fails the gradient is NaN (with ``debug``, an
        ``ArgumentError``).
      drift_tol: the self-check's tolerance. Wherever the sweep meets an exact
        cotangent (the loss head, an anchor, a recorded fragment) it measures its
        drift ``‖ĝ - g‖ / ‖g‖``; beyond ``drift_tol`` the gradient would not be accurate
        and is not returned. ``None``: by the network input's dtype, float32 1.5e-5
        (128 eps), float64 1e-9, 16-bit 64 of their eps.
      on_drift: ``"raise"`` (default): a drift beyond the tolerance raises
        ``moonjax.DriftError`` naming where it was measured, the steps that
        amplify rounding with their source lines, and what to do; the call waits for
        its result to check (under an outer ``jax.jit`` nothing waits, and the message
        arrives in JAX's ``JaxRuntimeError`` when the result is used:
        ``moonjax.from_runtime_error`` turns it back). ``"nan"``: every gradient
        is NaN instead, with no host callback.
      debug: raise ``moonjax.NonFiniteCotangentError`` if a swept cotangent is
        NaN/Inf (a singular weight), like ``jax_debug_nans``, naming the primitive and
        the source line. The call then waits for its result; under an outer
        ``jax.jit`` the same message arrives in JAX's ``JaxRuntimeError``.

    Returns:
      A function with the signature of ``fun`` returning ``(value, grads)``
      (``((value, aux), grads)`` with ``has_aux``).

    Raises:
      moonjax.ArgumentError: an invalid option or argument (see ``moonwalk_grad``).
      moonjax.LossShapeError: ``fun`` does not return a real scalar.
      moonjax.DriftError: the self-check found the gradient inaccurate (see
        ``moonwalk_grad`` for this and the structure errors of ``fragments=False``).

    Example:
      >>> import jax, jax.numpy as jnp, moonjax
      >>> def loss(w, x):
      ...     return jnp.sum(jnp.tanh(x @ w) ** 2)
      >>> w, x = jnp.eye(3), jnp.ones((2, 3))
      >>> v, g = moonjax.moonwalk_value_and_grad(loss)(w, x)
      >>> bool(jnp.allclose(g, jax.grad(loss)(w, x), atol=1e-5))
      True
    """
    if mode not in MODES:
        raise ArgumentError(f"mode must be one of {MODES}, got {mode!r}")
    if anchor_every is not None and anchor_every != "auto" and (
            not isinstance(anchor_every, int) or anchor_every < 1):
        raise ArgumentError(f"anchor_every must be a positive int, 'auto' or None, got "
                            f"{anchor_every!r}")
    if on_drift not in ("raise", "nan"):
        raise ArgumentError(f"on_drift must be 'raise' or 'nan', got {on_drift!r}")
    if drift_tol is not None and not (isinstance(drift_tol, (int, float)) and drift_tol > 0):
        raise ArgumentError(f"drift_tol must be a positive number or None, got {drift_tol!r}")
    if batch_axis is not None and (mode != "forward" or batch_axis != 0
                                   or isinstance(batch_axis, bool)):
        raise ArgumentError(
            f"batch_axis={batch_axis!r} with mode={mode!r}: batch_axis=0 (examples along "
            "axis 0 of the input are independent) is an option of mode='forward'; the "
            "other modes need no such hint")

    def checked(static, *dynamic):
        value, grads, (drifts, amplifiers), treatment = _moonwalk(
            fun, has_aux, mode, fragments, static.anchors, debug, static, dynamic, batch_axis)
        hint = D.HINTS.get((mode, treatment), "") + (
            D.HINTS["batch_axis"] if batch_axis is not None else "")
        loss = value[0] if has_aux else value
        return value, D.guard(grads, drifts, amplifiers, static.drift_tol, on_drift, hint,
                              loss)

    compiled = jax.jit(checked, static_argnums=0)

    def prepare(args, kwargs):
        nargs = len(args)
        diff = _normalize_argnums(argnums, nargs, "argnums")
        leaves, treedefs = [], []
        for a in (*args, kwargs):
            lv, td = jax.tree_util.tree_flatten(a)
            leaves.append(lv)
            treedefs.append(td)
        if stream_argnums is None:
            # the network input: the first argument with a float leaf after the
            # differentiated ones (``loss(params, x, y)``), else before them
            rest = [i for i in range(nargs) if i not in diff]
            after = [i for i in rest if i > max(diff)]
            floats = [i for i in after + [i for i in rest if i not in after]
                      if any(_inexact(leaf) for leaf in leaves[i])]
            stream_ix = tuple((floats or after or rest)[:1])
        else:
            stream_ix = _normalize_argnums(stream_argnums, nargs, "stream_argnums")
        for i in diff:
            for leaf in leaves[i]:
                dtype = _dtype(leaf)
                if dtype is None or not jnp.issubdtype(dtype, jnp.inexact):
                    raise ArgumentError(
                        f"argument {i} to differentiate has a leaf of type {dtype or type(leaf)}"
                        "; like jax.grad, moonwalk_grad differentiates float inputs only")
        offsets = tuple(itertools.accumulate([0] + [len(lv) for lv in leaves]))
        flat = list(itertools.chain.from_iterable(leaves))
        stream_flat = tuple(j for i in stream_ix for j in range(offsets[i], offsets[i + 1])
                            if _inexact(flat[j]))
        if not stream_flat and (mode != "auto" or stream_argnums is not None):
            raise ArgumentError(_no_stream_message(stream_ix, stream_argnums, diff, leaves))
        params_flat = tuple(j for i in diff for j in range(offsets[i], offsets[i + 1]))
        is_dynamic = [_dtype(leaf) is not None for leaf in flat]
        static_leaves = tuple((j, leaf) for j, leaf in enumerate(flat) if not is_dynamic[j])
        anchors = anchor_every
        # no network input (it is closed over): the default runs reverse mode
        tol = drift_tol if drift_tol is not None else min(
            (D.tolerance(_dtype(flat[j])) for j in stream_flat or params_flat),
            default=D.tolerance(np.float32))
        static = _Static(tuple(treedefs), offsets, diff, stream_flat, params_flat,
                         static_leaves, isinstance(argnums, int), anchors, float(tol))
        dynamic = [leaf for j, leaf in enumerate(flat) if is_dynamic[j]]
        return static, dynamic

    @functools.wraps(fun)
    def value_and_grad_fn(*args, **kwargs):
        static, dynamic = prepare(args, kwargs)
        try:
            hash(static)
        except TypeError:  # unhashable non-array arguments: run without the cache
            run = functools.partial(checked, static)
        else:
            run = functools.partial(compiled, static)
        return _checked_at_call(run, dynamic) if debug or on_drift == "raise" else run(*dynamic)

    def drifts(*args, **kwargs):
        """``(grads, [(Meeting, drift)], amplifying steps, tolerance)``, unchecked and
        eager: what ``moonjax.fidelity`` and ``moonjax.check`` report."""
        static, dynamic = prepare(args, kwargs)
        _, grads, (found, amplifiers), _ = _moonwalk(
            fun, has_aux, mode, fragments, static.anchors, debug, static, dynamic, batch_axis)
        return grads, [(m, float(d)) for m, d in found], amplifiers, static.drift_tol

    value_and_grad_fn.drifts = drifts
    return value_and_grad_fn


# ``anchor_every="auto"``: loops whose swept layers divide by a derivative or solve
# with a weight (error can grow layer by layer) are anchored every AUTO_ANCHOR steps
# (phase1.AUTO_ANCHOR), more often after a small slope (growth AUTO_GROWTH at most);
# volume-preserving ones (additive couplings, shifts, moves) are not anchored.
AUTO_GROWTH = 100.0


def _amplifies(step) -> bool:
    for s in step.inner:
        if s.kind == "spine" and any(n.primitive.name == "dot_general" for n in s.nodes):
            return True
        if s.kind == "region" and any(n.primitive.name not in SHIFTS for n in s.nodes):
            return True
    return False


def _auto_interval(step) -> int:
    """How often ``"auto"`` anchors a loop: every ``AUTO_ANCHOR`` steps, or more often
    where its body divides by a known small slope ``s`` (leaky-ReLU's ``mul`` by a
    constant): every ``k`` steps with ``(1/s)^k`` at most ``AUTO_GROWTH``."""
    scalars = [_literal(a) for s in step.inner if s.kind == "region" for n in s.nodes
               if n.primitive.name == "mul" for a in n.inputs]
    slopes = [abs(c) for c in scalars if c is not None and 0 < abs(c) < 1]
    if not slopes:
        return AUTO_ANCHOR
    return max(1, min(AUTO_ANCHOR, int(math.log(AUTO_GROWTH) / -math.log(min(slopes)))))


def _literal(a) -> float | None:
    """The value of a scalar literal operand, looking through dtype conversions."""
    while isinstance(a, G.Value) and a.producer is not None and (
            a.producer.primitive.name in ("convert_element_type", "broadcast_in_dim")):
        a = a.producer.inputs[0]
    if isinstance(a, G.Lit) and np.ndim(a.val) == 0:
        return float(a.val)
    return None


def _auto_anchors(graph, stream_pos, steps) -> dict:
    """``anchor_every="auto"``: the loops whose swept body amplifies rounding (every 2
    steps at most for 16-bit inputs, whose phase-1 cotangent starts at ~1e-3 error)."""
    half = any(graph.invars[i].aval.dtype.itemsize < 4 for i in stream_pos)
    plan = {}
    for s in steps:
        if s.kind == "scan" and _amplifies(s):
            i = s.nodes[0].index
            k = min(_auto_interval(s), 2) if half else _auto_interval(s)
            entry = anchor_plan(graph, stream_pos, k).get(i)
            if entry is not None:
                plan[i] = entry
    return plan


@contextlib.contextmanager
def _reporting(active: bool):
    """The sweep's steps (``REPORT``) while the block runs, if ``active``."""
    steps: list = []
    token = REPORT.set(steps if active else None)
    try:
        yield steps
    finally:
        REPORT.reset(token)


def _sweep_needs(graph, stream_pos, run_sweep, fragments: bool, anchor_every):
    """What mixed phase 1 records for the sweep: ``(fragments, anchors)``. One abstract
    pass of the sweep (shapes only, under ``jax.eval_shape``: none of it runs)
    finds the spine steps it cannot invert (the fragments, with ``fragments``; without,
    the first such step raises here) and the steps it crosses; the anchored loops are
    every top-level loop over the stream for an int ``anchor_every``, those whose swept
    body amplifies rounding for ``"auto"``."""
    collected = Collect() if fragments else None
    auto = anchor_every == "auto"
    zeros = {i: jnp.zeros(graph.invars[i].aval.shape, graph.invars[i].aval.dtype)
             for i in stream_pos}
    def dry_run():  # for what it finds and reports; its values are not wanted
        run_sweep(zeros, fragments=collected)

    with _reporting(auto) as steps:
        jax.eval_shape(dry_run)
    if isinstance(anchor_every, int):
        anchors = anchor_plan(graph, stream_pos, anchor_every)
    else:
        anchors = _auto_anchors(graph, stream_pos, steps) if auto else {}
    return collected if collected is not None else Collect(), anchors


class _Static(NamedTuple):
    treedefs: tuple
    offsets: tuple
    diff: tuple
    stream: tuple
    params: tuple
    static_leaves: tuple
    single: bool
    anchors: int | str | None
    drift_tol: float


def _inexact(leaf) -> bool:
    dtype = _dtype(leaf)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _dtype(leaf):
    """The dtype of an array-like leaf, ``None`` for anything else (static)."""
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, int, complex)):
        return jnp.result_type(leaf)
    return None


def _moonwalk(fun, has_aux, mode, fragments, anchor_every, debug, static: _Static,
              dynamic, batch_axis=None):
    """Phase 1 then the sweep, on flat leaves; returns ``(value, grads)``."""
    static_at = dict(static.static_leaves)
    it = iter(dynamic)
    flat = [static_at[j] if j in static_at else next(it) for j in range(static.offsets[-1])]
    offsets, treedefs = static.offsets, static.treedefs

    def call(flat_vals):
        rebuilt = [
            jax.tree_util.tree_unflatten(td, flat_vals[offsets[i]:offsets[i + 1]])
            for i, td in enumerate(treedefs)
        ]
        out = fun(*rebuilt[:-1], **rebuilt[-1])
        _check_loss(out, has_aux)
        return out

    dyn_ix = [j for j in range(len(flat)) if j not in static_at]

    def traced(with_aux: bool):
        """The loss (and its aux leaves) as a graph over the dynamic leaves: the graph,
        its input values, each dynamic leaf's invar position, and ``outs -> (loss, aux)``."""
        aux_tree = {}

        def loss_fn(*dyn_vals):
            vals = list(flat)
            for j, v in zip(dyn_ix, dyn_vals):
                vals[j] = v
            out = call(vals)
            if not has_aux:
                return [out]
            if not with_aux:
                return [out[0]]
            aux_leaves, aux_tree["tree"] = jax.tree_util.tree_flatten(out[1])
            return [out[0], *aux_leaves]

        graph, consts = G.flatten(jax.make_jaxpr(loss_fn)(*[flat[j] for j in dyn_ix]))
        pos = {j: len(consts) + k for k, j in enumerate(dyn_ix)}
        unpack = lambda outs: (outs[0], jax.tree_util.tree_unflatten(
            aux_tree["tree"], outs[1:]) if "tree" in aux_tree else None)
        return graph, list(consts) + [flat[j] for j in dyn_ix], pos, unpack

    graph, invals, pos, _ = traced(False)
    stream_pos = [pos[j] for j in static.stream]
    treatment = mode
    inverted = {}  # loops whose mixed phase 1 runs by inversion: one carry kept
    if mode == "auto" and not stream_pos:  # no network input: nothing to invert
        treatment = "reverse"
    elif mode == "auto":  # the plan: from the program alone
        program = analyse(graph, stream_pos)
        treatment = RUNS[program.treatment]
        inverted = {lp.node.index: lp.body for lp in program.loops
                    if lp.treatment == REVERSIBLE}
    def with_aux():
        """The program of the loss and its aux: graph, inputs, positions, unpack."""
        return traced(True) if has_aux else (graph, invals, pos,
                                             lambda outs: (outs[0], None))

    if treatment in ("reversible", "checkpointed", "reverse"):  # every cotangent at once
        graph_aux, invals_aux, pos_aux, unpack = with_aux()
        stream_at = [pos_aux[j] for j in static.stream]
        checkpointed = {}
        # the plan's unrolled runs, where the plan read this same program
        runs = program.runs if mode == "auto" and stream_pos and not has_aux else None
        if treatment == "checkpointed":  # the plan's loops, in the traced program
            loops = analyse(graph_aux, stream_at).loops if has_aux else program.loops
            checkpointed = {lp.node.index: lp.anchor_every for lp in loops
                            if lp.treatment == CHECKPOINTED}
        wanted = list(dict.fromkeys(static.stream + static.params))
        with D.measuring() as measured:
            # forced reversible mode checkpoints the loops it cannot invert (fragments)
            outs, cts = reversible_backprop(graph_aux, invals_aux, stream_at,
                                            [pos_aux[j] for j in wanted], anchor_every,
                                            checkpointed, fallback=fragments,
                                            recompute=mode == "auto", runs=runs)
        loss, aux = unpack(outs)
        value = (loss, aux) if has_aux else loss
        return value, _grads(static, flat, dict(zip(wanted, cts))), measured, treatment

    # Phase 2: the sweep, on the program of the loss alone.
    stream_mask = [False] * len(invals)
    params_mask = [False] * len(invals)
    for j in static.stream:
        stream_mask[pos[j]] = True
    for j in static.params:
        params_mask[pos[j]] = True
    run_sweep = functools.partial(sweep, graph, invals, stream_mask, head=True,
                                  params=params_mask, debug=debug)
    recorded = None
    if treatment == "forward" and batch_axis is not None:
        graph_aux, invals_aux, pos_aux, unpack = with_aux()
        outs, g_stream = forward_batched(graph_aux, invals_aux,
                                         [pos_aux[j] for j in static.stream], debug=debug)
        loss, aux = unpack(outs)
    elif treatment == "forward":  # JVPs for the stream and the fragments
        collected = _sweep_needs(graph, stream_pos, run_sweep, fragments, None)[0]
        outs, g_stream, recorded = phase1_forward(graph, invals, stream_pos, collected)
        loss = outs[0]
        aux = call(flat)[1] if has_aux else None
    else:
        collected, anchors = _sweep_needs(graph, stream_pos, run_sweep, fragments,
                                          anchor_every)
        if has_aux and not (collected or anchors or inverted):
            # nothing to record: phase 1 is the reverse pass of the user's function
            def phase1(*stream_vals):
                vals = list(flat)
                for j, s in zip(static.stream, stream_vals):
                    vals[j] = s
                out = call(vals)
                return out[0], out[1]

            loss, pullback, aux = jax.vjp(phase1, *[flat[j] for j in static.stream],
                                          has_aux=True)
            g_stream = pullback(jnp.ones_like(loss))
        else:
            outs, g_stream, recorded = mixed_with_probes(graph, invals, stream_pos, collected,
                                                         anchors, inverted)
            loss = outs[0]
            aux = call(flat)[1] if has_aux else None
    known = {pos[j]: g for j, g in zip(static.stream, g_stream)}
    with D.measuring() as measured:
        if batch_axis is not None:
            try:
                _, _, in_cts = run_sweep(known)
            except (NotSubmersiveError, UnsupportedPrimitiveError, SpineStructureError) as e:
                if not fragments:
                    raise
                raise type(e)(f"{e}\n  note: batch_axis=0 records no fragments; without it "
                              "mode='forward' records what this layer erases") from None
        else:
            _, _, in_cts = run_sweep(known, fragments=recorded)
    cts = {j: in_cts[pos[j]] for j in static.params}
    cts.update(zip(static.stream, g_stream))
    value = (loss, aux) if has_aux else loss
    return value, _grads(static, flat, cts), measured, treatment


def _grads(static: _Static, flat, cts: dict):
    """The gradients' pytrees from the cotangents ``cts`` of the flat leaves."""
    grads = []
    for i in static.diff:
        gl = [cts.get(j) for j in range(static.offsets[i], static.offsets[i + 1])]
        gl = [c if c is not None else jnp.zeros_like(x)
              for c, x in zip(gl, flat[static.offsets[i]:static.offsets[i + 1]])]
        grads.append(jax.tree_util.tree_unflatten(static.treedefs[i], gl))
    return grads[0] if static.single else tuple(grads)


def moonwalk_grad(
    fun: Callable,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    *,
    stream_argnums: int | Sequence[int] | None = None,
    mode: str = "auto",
    fragments: bool = True,
    anchor_every: int | str | None = "auto",
    batch_axis: int | None = None,
    drift_tol: float | None = None,
    on_drift: str = "raise",
    debug: bool = False,
) -> Callable:
    """Like ``jax.grad``, computed by Moonwalk (inverse-forward differentiation).

    Same contract as ``jax.grad``: ``argnums`` int or tuple, ``has_aux``, pytrees,
    works under ``jax.jit`` and ``jax.vmap``. See ``moonwalk_value_and_grad`` for
    the method.

    Args:
      fun: the loss, returning a real scalar (or ``(loss, aux)`` with ``has_aux``).
      argnums: which positional argument(s) to differentiate, as in ``jax.grad``.
      has_aux: as in ``jax.grad``.
      stream_argnums: as in ``moonwalk_value_and_grad``.
      mode: as in ``moonwalk_value_and_grad``.
      fragments: as in ``moonwalk_value_and_grad``.
      anchor_every: as in ``moonwalk_value_and_grad``.
      batch_axis: as in ``moonwalk_value_and_grad``.
      drift_tol: as in ``moonwalk_value_and_grad``.
      on_drift: as in ``moonwalk_value_and_grad``.
      debug: as in ``moonwalk_value_and_grad``.

    Returns:
      A function with the signature of ``fun`` returning the gradients (``(grads,
      aux)`` with ``has_aux``), shaped like the arguments in ``argnums``.

    Raises:
      moonjax.ArgumentError: an invalid option (when the transform is made) or argument
        (when it is called: ``argnums`` out of range, a non-float argument to
        differentiate).
      moonjax.LossShapeError: ``fun`` does not return a real scalar.
      moonjax.DriftError: the self-check found the gradient inaccurate (``on_drift=
        "raise"``); inside an outer ``jax.jit`` it arrives in a
        ``jax.errors.JaxRuntimeError`` (``moonjax.from_runtime_error``).
      moonjax.NotSubmersiveError: with ``fragments=False``, a layer the sweep cannot
        cross (not submersive).
      moonjax.SpineStructureError: with ``fragments=False``, a program whose spine the
        sweep cannot follow (a value entering one operation twice).
      moonjax.UnsupportedPrimitiveError: with ``fragments=False``, a primitive with no
        vijp rule on the spine.

    Example:
      >>> import jax, jax.numpy as jnp, moonjax
      >>> loss = lambda w, x: jnp.mean(jax.nn.leaky_relu(x @ w, 0.2))
      >>> g = jax.jit(moonjax.moonwalk_grad(loss))(jnp.eye(4), jnp.ones((8, 4)))
      >>> g.shape
      (4, 4)
    """
    vg = moonwalk_value_and_grad(fun, argnums, has_aux, stream_argnums=stream_argnums,
                                 mode=mode, fragments=fragments, anchor_every=anchor_every,
                                 batch_axis=batch_axis, drift_tol=drift_tol,
                                 on_drift=on_drift, debug=debug)

    @functools.wraps(fun)
    def grad_fn(*args, **kwargs):
        value, grads = vg(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return grad_fn


def vijp(fun: Callable, *primals: Any, debug: bool = False) -> tuple[Any, Callable]:
    """The vector–inverse-Jacobian product of a submersive ``fun`` at ``primals``.

    ``vijp_fn(g_in)`` takes cotangents shaped like ``primals`` and returns the unique
    output cotangent ``g_out`` with ``jax.vjp(fun, *primals)[1](g_out) == g_in`` — the
    inverse of the vjp. It exists when ``fun``'s Jacobian is surjective (an invertible
    layer, or one that lowers the dimension with full rank) and ``g_in`` lies in the
    Jacobian's row space.

    Args:
      fun: the function (a layer, or a stack of them).
      *primals: where to linearise it: float arrays or pytrees of them.
      debug: raise ``moonjax.NonFiniteCotangentError`` at the first non-finite swept
        cotangent (a singular weight), naming its primitive and line.

    Returns:
      ``(out, vijp_fn)``: ``fun(*primals)`` and the inverse of its vjp.

    Raises:
      moonjax.ArgumentError: a primal is not a float array, or ``vijp_fn`` gets
        cotangents shaped unlike the primals.
      moonjax.NotSubmersiveError: ``fun`` is not submersive at a layer (when
        ``vijp_fn`` is called).

    Example:
      >>> import jax.numpy as jnp, moonjax
      >>> w = jnp.array([[2.0, 1.0], [0.0, 1.0]])
      >>> out, vijp_fn = moonjax.vijp(lambda x: jnp.tanh(x @ w), jnp.ones((1, 2)))
      >>> g_out = vijp_fn(jnp.ones((1, 2)))
    """
    leaves, in_tree = jax.tree_util.tree_flatten(primals)
    for leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise ArgumentError("vijp takes float inputs only")
    out_store = {}

    def flat_fun(*ls):
        out = fun(*jax.tree_util.tree_unflatten(in_tree, list(ls)))
        out_leaves, out_store["tree"] = jax.tree_util.tree_flatten(out)
        return out_leaves

    closed = jax.make_jaxpr(flat_fun)(*leaves)
    out_tree = out_store["tree"]
    graph, consts = G.flatten(closed)
    nc = len(consts)
    out = jax.tree_util.tree_unflatten(out_tree, flat_fun(*leaves))

    def vijp_fn(*g_in):
        g_leaves = jax.tree_util.tree_leaves(g_in)
        if len(g_leaves) != len(leaves):
            raise ArgumentError(
                f"vijp_fn expects cotangents shaped like the primals ({len(leaves)} "
                f"leaves), got {len(g_leaves)}")
        mask = [False] * nc + [True] * len(leaves)
        known = {nc + k: g for k, g in enumerate(g_leaves)}
        _, out_cts, _ = sweep(graph, list(consts) + leaves, mask, known, head=False,
                              debug=debug)
        out_cts = [c if c is not None else jnp.zeros_like(o)
                   for c, o in zip(out_cts, jax.tree_util.tree_leaves(out))]
        return jax.tree_util.tree_unflatten(out_tree, out_cts)

    return out, vijp_fn


_custom_ids = itertools.count()


class custom_vijp:
    """A block with a hand-written vijp, like ``jax.custom_vjp``.

    The decorated function's first argument is the spine (any pytree of float arrays);
    the others are parameters or side inputs. ``defvijp(rule)`` sets
    ``rule(*args, g_x) -> g_y``: given the block's arguments and the cotangent of its
    first argument, the unique cotangent of its output. Parameter cotangents are then
    pulled back through the block with ordinary reverse mode, and ``jax.grad`` of the
    block is unaffected.

    Args:
      fun: the block, ``fun(x, *others)``.

    Raises:
      moonjax.ArgumentError: the block is called before ``defvijp`` gave it a rule.

    Example:
      >>> import jax.numpy as jnp, moonjax
      >>> @moonjax.custom_vijp
      ... def scale(x, s):
      ...     return x * jnp.exp(s)
      >>> @scale.defvijp
      ... def _(x, s, g):
      ...     return g * jnp.exp(-s)
    """

    def __init__(self, fun: Callable):
        functools.update_wrapper(self, fun)
        self.fun = fun
        self.rule: Callable | None = None
        self._jitted: dict = {}

    def defvijp(self, rule: Callable) -> Callable:
        self.rule = rule
        return rule

    def __call__(self, *args):
        if self.rule is None:
            raise ArgumentError(
                f"custom_vijp function {self.fun.__name__} has no rule: call defvijp")
        leaves, in_tree = jax.tree_util.tree_flatten(args)
        n_spine = len(jax.tree_util.tree_leaves(args[0]))
        jitted = self._jitted.get(in_tree)
        if jitted is None:
            name = f"moonjax_custom_vijp_{next(_custom_ids)}_{self.fun.__name__}"
            fun, rule = self.fun, self.rule
            out_tree_box = {}

            def flat(*ls):
                out = fun(*jax.tree_util.tree_unflatten(in_tree, list(ls)))
                out_leaves, out_tree_box["tree"] = jax.tree_util.tree_flatten(out)
                return out_leaves

            flat.__name__ = name

            def block_vijp(node, positions, g_ins, invals):
                rebuilt = jax.tree_util.tree_unflatten(in_tree, list(invals))
                g_x = jax.tree_util.tree_unflatten(
                    jax.tree_util.tree_structure(rebuilt[0]), list(g_ins))
                g_y = rule(*rebuilt, g_x)
                return jax.tree_util.tree_leaves(g_y)

            G.CUSTOM_BLOCKS[name] = VijpRule(block_vijp, merge=True, spine_arity=n_spine)
            jitted = (jax.jit(flat), out_tree_box)
            self._jitted[in_tree] = jitted
        fn, box = jitted
        out_leaves = fn(*leaves)
        return jax.tree_util.tree_unflatten(box["tree"], out_leaves)
