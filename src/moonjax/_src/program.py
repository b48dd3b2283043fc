"""The user's loss as a program on flat leaves: what every treatment reads.

``Static`` is what a call's arguments fix (their tree structures, which leaves are
differentiated, which are the network input, the non-array leaves); ``Program`` traces
the loss on the call's flat leaves into a ``moonjax._src.graph.Graph`` and gives the
gradients back the arguments' shapes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from moonjax._src import drift as D
from moonjax._src import graph as G
from moonjax._src.errors import ArgumentError, LossShapeError


class Static(NamedTuple):
    """What a call fixes: hashable, a ``jax.jit`` static argument."""

    treedefs: tuple  # each positional argument's, then the keyword arguments'
    offsets: tuple  # where each argument's leaves start among the flat leaves
    diff: tuple  # the differentiated arguments
    stream: tuple  # the flat leaves of the network input
    params: tuple  # the flat leaves differentiated
    static_leaves: tuple  # (position, leaf) of the non-array leaves
    single: bool  # argnums was an int
    anchors: int | str | None
    drift_tol: float


def flatten_call(args, kwargs, argnums, stream_argnums, mode: str, anchor_every,
                 drift_tol) -> tuple[Static, list]:
    """A call's arguments as ``(Static, dynamic leaves)``: which leaves are
    differentiated (``argnums``), which are the network input (``stream_argnums``, by
    default the first argument with a float leaf after those differentiated, else
    before them), the drift tolerance; ``ArgumentError`` for arguments that cannot be."""
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
    static = Static(tuple(treedefs), offsets, diff, stream_flat, params_flat,
                     static_leaves, isinstance(argnums, int), anchors, float(tol))
    dynamic = [leaf for j, leaf in enumerate(flat) if is_dynamic[j]]
    return static, dynamic


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


def _inexact(leaf) -> bool:
    dtype = _dtype(leaf)
    return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def _dtype(leaf):
    """The dtype of an array-like leaf, ``None`` for anything else (static)."""
    if isinstance(leaf, (jax.Array, np.ndarray, np.generic, float, int, complex)):
        return jnp.result_type(leaf)
    return None


def check_loss(out, has_aux: bool):
    """Raise ``LossShapeError`` unless ``out`` is a real scalar (a pair with one)."""
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


@dataclasses.dataclass
class Traced:
    """The loss (and with ``has_aux`` its aux leaves) as a graph over the dynamic
    leaves: the graph, its input values, each dynamic leaf's invar position, and
    ``unpack(outs) -> (loss, aux)``."""

    graph: G.Graph
    invals: list
    pos: dict
    unpack: Callable


@dataclasses.dataclass
class Program:
    """The loss ``fun`` on one call's flat leaves ``flat`` (``static`` places them)."""

    fun: Callable
    has_aux: bool
    static: Static
    flat: list

    @classmethod
    def of(cls, fun, has_aux: bool, static: Static, dynamic) -> Program:
        static_at = dict(static.static_leaves)
        it = iter(dynamic)
        flat = [static_at[j] if j in static_at else next(it)
                for j in range(static.offsets[-1])]
        return cls(fun, has_aux, static, flat)

    def call(self, flat_vals) -> Any:
        """``fun`` on the flat leaves ``flat_vals``: its output, checked."""
        offsets = self.static.offsets
        args = [jax.tree_util.tree_unflatten(td, flat_vals[offsets[i]:offsets[i + 1]])
                for i, td in enumerate(self.static.treedefs)]
        out = self.fun(*args[:-1], **args[-1])
        check_loss(out, self.has_aux)
        return out

    @functools.cached_property
    def dynamic(self) -> list[int]:
        """The positions of the array leaves (the traced ones)."""
        static_at = dict(self.static.static_leaves)
        return [j for j in range(len(self.flat)) if j not in static_at]

    def trace(self, with_aux: bool = False) -> Traced:
        """The loss alone, or with ``with_aux`` (and ``has_aux``) its aux leaves too."""
        aux_tree = {}
        with_aux = with_aux and self.has_aux

        def loss_fn(*dyn_vals):
            vals = list(self.flat)
            for j, v in zip(self.dynamic, dyn_vals):
                vals[j] = v
            out = self.call(vals)
            if not self.has_aux:
                return [out]
            if not with_aux:
                return [out[0]]
            aux_leaves, aux_tree["tree"] = jax.tree_util.tree_flatten(out[1])
            return [out[0], *aux_leaves]

        graph, consts = G.flatten(jax.make_jaxpr(loss_fn)(
            *[self.flat[j] for j in self.dynamic]))
        pos = {j: len(consts) + k for k, j in enumerate(self.dynamic)}

        def unpack(outs):
            if "tree" not in aux_tree:
                return outs[0], None
            return outs[0], jax.tree_util.tree_unflatten(aux_tree["tree"], outs[1:])

        return Traced(graph, list(consts) + [self.flat[j] for j in self.dynamic], pos,
                      unpack)

    @functools.cached_property
    def loss_only(self) -> Traced:
        return self.trace(False)

    def with_aux(self) -> Traced:
        """The program of the loss and its aux (the loss's own where there is none)."""
        return self.trace(True) if self.has_aux else self.loss_only

    def vjp(self, wanted) -> tuple[Any, dict]:
        """``jax.vjp`` of ``fun`` itself on the flat leaves ``wanted``: exactly
        ``jax.grad``'s computation (its custom rules and residuals as written).
        Returns the value (``(loss, aux)`` with ``has_aux``) and the cotangents by
        flat leaf."""
        def f(*vals):
            flat = list(self.flat)
            for j, v in zip(wanted, vals):
                flat[j] = v
            out = self.call(flat)
            return (out[0], out[1]) if self.has_aux else (out, None)

        loss, pullback, aux = jax.vjp(f, *[self.flat[j] for j in wanted], has_aux=True)
        value = (loss, aux) if self.has_aux else loss
        return value, dict(zip(wanted, pullback(jnp.ones_like(loss))))

    def grads(self, cts: dict):
        """The gradients' pytrees from the cotangents ``cts`` of the flat leaves."""
        static, grads = self.static, []
        for i in static.diff:
            span = range(static.offsets[i], static.offsets[i + 1])
            leaves = [cts[j] if cts.get(j) is not None else jnp.zeros_like(self.flat[j])
                      for j in span]
            grads.append(jax.tree_util.tree_unflatten(static.treedefs[i], leaves))
        return grads[0] if static.single else tuple(grads)
