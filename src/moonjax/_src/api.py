"""Public transforms: ``moonwalk_grad``, ``moonwalk_value_and_grad``, ``vijp``, ``custom_vijp``."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from moonjax._src import drift as D
from moonjax._src import graph as G
from moonjax._src import moonwalk, reverse
from moonjax._src.errors import ArgumentError, from_runtime_error
from moonjax._src.plan import RUNS, analyse
from moonjax._src.program import Program, Static, flatten_call
from moonjax._src.rules import VijpRule
from moonjax._src.sweep import sweep

MODES = ("auto", "mixed", "reversible", "forward")


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
        ``depth / k`` stored cotangents. ``"auto"`` (the default) anchors the loops
        whose sweep divides by derivatives or solves with weights: every
        ``min(sqrt(depth), k_s)`` steps where the only nonlinearity is a known slope
        ``s`` (leaky-ReLU MLPs; ``k_s`` the most steps with ``(1/s)^k <= 100``), every
        4 (at most ``k_s``) elsewhere (affine couplings, LU dense layers, tanh), every 2
        at most for 16-bit inputs, and leaves volume-preserving ones (additive
        couplings) alone; ``None``
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
    _check_options(mode, anchor_every, on_drift, drift_tol, batch_axis)

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
        return flatten_call(args, kwargs, argnums, stream_argnums, mode, anchor_every,
                            drift_tol)

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


def _check_options(mode, anchor_every, on_drift, drift_tol, batch_axis):
    """Raise ``ArgumentError`` for an invalid option of ``moonwalk_value_and_grad``."""
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


def _moonwalk(fun, has_aux, mode, fragments, anchor_every, debug, static: Static,
              dynamic, batch_axis=None):
    """The plan, then its treatment, on the call's flat leaves: ``(value, grads,
    (drifts, amplifying steps), treatment)``."""
    program = Program.of(fun, has_aux, static, dynamic)
    traced = program.loss_only
    stream_pos = [traced.pos[j] for j in static.stream]
    plan = None  # from the program alone; no network input: reverse mode
    if stream_pos and mode in ("auto", "mixed"):
        plan = analyse(traced.graph, stream_pos)
    treatment = mode if mode != "auto" else RUNS[plan.treatment] if plan else "reverse"
    with D.measuring() as measured:
        if treatment in ("mixed", "forward"):
            value, cts = moonwalk.gradient(program, plan, treatment, fragments,
                                           anchor_every, debug, batch_axis)
        else:
            value, cts = reverse.gradient(program, plan if mode == "auto" else None,
                                          anchor_every, fragments)
    return value, program.grads(cts), measured, treatment


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
