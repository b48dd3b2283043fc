"""The inverse-forward sweep over a flattened program.

Given the exact cotangents of the *stream* inputs (the network input, from phase 1),
``sweep`` walks the program forwards once and recovers every other cotangent:

* A value ``v`` whose total cotangent is known, and all of whose uses but one are
  already accounted for, crosses that last use with a vijp rule: the use's output
  cotangent is the unique solution of ``g_v = vjp(use)(g_out)`` — the *spine* step.
* A value all of whose uses are accounted for gets its cotangent as the plain sum of
  their contributions (ordinary reverse mode) — a *side* branch, differentiated
  locally while its block's values are alive, or the loss *head* at the very end.
* Values that do not depend on the stream (parameters and what is computed from them
  alone) are evaluated up front; their cotangents are pulled back once at the end.

Every spine step also pulls its output cotangent back to its other operands, which is
where parameter gradients come from. Nothing of a layer outlives the layer, so the
sweep's memory does not grow with depth. ``scan`` over layers sweeps with a scan.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moonjax._src import drift as D
from moonjax._src import graph as G
from moonjax._src.errors import (
    NON_FINITE,
    MoonjaxError,
    NotSubmersiveError,
    SpineStructureError,
    UnsupportedPrimitiveError,
    equation_error,
    where,
)
from moonjax._src.rules import DEBUG, ct_dtype, elementwise_rules, vijp_rules
from moonjax._src.rules.factors import Weight, weight_factors
from moonjax._src.rules.monotone import derivative_sign
from moonjax._src.rules.structural import slice_partition

# Elementwise primitives whose sweep only shifts or moves values (volume-preserving:
# no division by a derivative), and spine primitives whose vijp solves with a weight.
SHIFTS = frozenset({"add", "sub", "neg", "copy", "convert_element_type", "ge", "gt", "le",
                    "lt", "eq", "ne"})
SOLVES = frozenset({"dot_general", "conv_general_dilated"})


# How the sweep crosses a loop: ``primitive -> fn(node, invals, g_carry, debug,
# fragments, anchors) -> (outs, out_cts, in_cts)``, registered by the module that
# implements it (``moonjax._src.scan`` for ``lax.scan``, imported with the package), so
# that this module imports none of them.
LOOPS: dict = {}


def is_float(aval) -> bool:
    return hasattr(aval, "dtype") and jnp.issubdtype(aval.dtype, jnp.inexact)


def _float_bytes(node) -> int:
    """Bytes of ``node``'s float outputs: what recording their cotangents stores."""
    return sum(o.aval.size * o.aval.dtype.itemsize for o in node.outputs if is_float(o.aval))


def _zeros(aval):
    if is_float(aval):
        return jnp.zeros(aval.shape, aval.dtype)
    return np.zeros(aval.shape, jax.dtypes.float0)


def _up(c):
    """A cotangent in the dtype the sweep keeps it in (float32 for 16-bit floats)."""
    dtype = getattr(c, "dtype", None)
    if dtype is None or dtype == jax.dtypes.float0:
        return c
    return c.astype(ct_dtype(dtype))


def _down(c, aval):
    """A cotangent in ``aval``'s own dtype, for a local pullback of the primal."""
    if c is None or not is_float(aval):
        return _zeros(aval) if c is None else c
    return c.astype(aval.dtype)


def _add(a, b):
    return b if a is None else a + b


class _Blocked:
    """Why the sweep could not cross the uses of a value (raised only if it matters)."""

    def __init__(self, value, node, error: MoonjaxError):
        self.value, self.node, self.error = value, node, error

    @property
    def order(self) -> int:
        return self.node.index if self.node is not None else -1


@dataclasses.dataclass(frozen=True)
class Step:
    """One decision of the sweep, for reports (``moonjax.check``).

    ``kind`` is ``"spine"`` (crossed by a vijp rule, named in ``rule``), ``"region"``
    (an elementwise region inverted as one map), ``"side"`` (a side branch
    differentiated locally), ``"head"`` (the loss head, reverse mode), ``"scan"``
    (a loop swept by a loop; ``inner`` holds its body's steps) or ``"fragment"``.
    """

    kind: str
    nodes: tuple
    rule: str = ""
    fragment_bytes: int = 0
    inner: tuple = ()


# When set to a list, the sweep appends a Step for every decision it takes.
REPORT: contextvars.ContextVar[list | None] = contextvars.ContextVar("moonjax_report",
                                                                     default=None)


def _report(kind, nodes, rule="", fragment_bytes=0, inner=()):
    steps = REPORT.get()
    if steps is not None:
        steps.append(Step(kind, tuple(nodes), rule, fragment_bytes, tuple(inner)))


def stream_dependence(graph: G.Graph, stream: list[bool]) -> set[int]:
    """Ids of the values that depend on the stream invars."""
    dep = {id(v) for v, s in zip(graph.invars, stream) if s}
    for node in graph.nodes:
        if any(isinstance(a, G.Value) and id(a) in dep for a in node.inputs):
            dep.update(id(o) for o in node.outputs)
    return dep


class Collect(dict):
    """Fragment collection: ``node.index -> output avals`` (nested ``Collect`` for loops)."""


def sweep(graph, invals, stream, known_cts, *, head, params=None, debug=False,
          fragments=None, recorded_outputs=()):
    """Run the inverse-forward sweep over ``graph``.

    Args:
      graph: the flattened program.
      invals: values of ``graph.invars``.
      stream: per invar, whether it is a spine root (its cotangent is known).
      known_cts: per invar index, the known total cotangent of that stream invar.
      head: ``True`` for a whole loss: ``outvars[0]`` is the scalar loss with
        cotangent 1 and the trailing non-submersive head is differentiated in reverse
        mode. ``False`` for a block: the cotangents of all outputs are swept.
      params: per invar, whether a non-stream invar is a trained parameter (used to
        refuse a head that would need stored activations). Defaults to all floats.
      debug: check swept cotangents for NaN/Inf.
      fragments: ``None`` (a non-submersive spine step raises), a ``Collect``
        (record where fragments are needed, sweep zeros there) or a dict
        ``node.index -> [output cotangents]`` recorded by phase 1 (for a ``scan``
        node: a nested dict whose arrays are stacked over the loop).
      recorded_outputs: positions in ``outvars`` (a block) whose cotangent is taken
        from phase 1's record of their producer before the sweep starts (a loop's
        log-determinant carry); needs ``fragments``.

    Returns:
      ``(outvals, out_cts, in_cts)``: output values, the swept output cotangents
      (``None`` where there is none) and the cotangents of the non-stream invars
      (``None`` for stream or non-float invars).
    """
    state = _Sweep(graph, invals, stream, known_cts, head, params, debug, fragments)
    state.recorded_outputs = [graph.outvars[i] for i in recorded_outputs]
    token = DEBUG.set(debug)
    try:
        return state.run()
    finally:
        DEBUG.reset(token)


class _Sweep:
    def __init__(self, graph, invals, stream, known_cts, head, params, debug, fragments):
        self.g = graph
        self.fragments = fragments
        self.head = head
        self.debug = debug
        self.dep = stream_dependence(graph, stream)
        self.stream_nodes = [
            n for n in graph.nodes
            if any(isinstance(a, G.Value) and id(a) in self.dep for a in n.inputs)
        ]
        self.stream_ids = {id(n) for n in self.stream_nodes}
        self.invals = invals
        self.stream = stream
        self.val: dict[int, object] = {}
        self.ct: dict[int, object] = {}  # known total cotangents (None: no cotangent)
        self.acc: dict[int, object] = {}  # contributions from resolved uses
        self.nacc: dict[int, object] = {}  # cotangents of non-stream values
        self.unresolved = {}  # id(value) -> list of (node, pos) not yet resolved
        self.evaluated: set[int] = set()
        self.resolved: set[int] = set()
        self.pullbacks: dict[int, object] = {}
        # values to try to sweep across their last use, and nodes to try to resolve in
        # reverse mode; the latter go first (see ``settle``)
        self.forward: deque = deque()
        self.backward: deque = deque()
        self.blocked: dict[int, _Blocked] = {}  # open: the sweep is stuck there now
        self.block_history: list[_Blocked] = []  # every place it was ever stuck
        self.head_nodes: set[int] = set()
        self.out_pending: set[int] = set()
        self.out_cts: dict[int, object] = {}
        self.consumed: set[int] = set()
        self.wake: dict[int, list] = {}  # node id -> values to retry once it is evaluated
        self.from_reverse: set[int] = set()  # values whose cotangent reverse mode summed
        self.divided: dict[int, tuple] = {}  # region output -> (swept input share, φ')
        self.side_records: set[int] = set()  # recorded side outputs (not swept onwards)
        self.escape_tier: dict[int, int] = {}  # value id -> escape records taken for it
        self.stalled: list = []  # values to retry when nothing else is left to do
        self.merges: dict[int, tuple] = {}  # value id -> (merge node, its entries, g_T)
        self.products: dict[int, tuple] = {}  # the same for masks written as products
        self.watch: dict[int, object] = {}  # value id -> value to retry as its uses resolve
        # weights that solving steps solve with (``VijpRule.solves``): value id -> their
        # factors (None: factorised), the solving steps not yet swept, and the
        # factorisations while those last
        self.weights: dict[int, list | None] = {}
        self.solve_uses: dict[int, int] = {}
        self.factorisations: dict[int, dict] = {}
        self._invar_at = {id(v): i for i, v in enumerate(graph.invars)}
        # inputs known when the program is traced (not trained parameters): constants
        self._by_value = [not isinstance(x, jax.core.Tracer) and not (params and params[i])
                          for i, x in enumerate(invals)]
        if params is None:
            params = [is_float(v.aval) for v in graph.invars]
        self.param_dep = {id(v) for v, p, s in zip(graph.invars, params, stream) if p and not s}
        self._params = [p and not s for p, s in zip(params, stream)]
        self._trained: set | None = None  # ids of the values computed from parameters
        self._known_cts = known_cts

    # -- bookkeeping -------------------------------------------------------------------

    def is_param(self, a) -> bool:
        return isinstance(a, G.Value) and id(a) in self.param_dep

    def read(self, a):
        return a.val if isinstance(a, G.Lit) else self.val[id(a)]

    def is_dep(self, a) -> bool:
        return isinstance(a, G.Value) and id(a) in self.dep

    def is_mask(self, a) -> bool:
        """Whether ``a`` may be a mask: a function of neither the input nor the trained
        parameters (a constant, ``iota``, a non-differentiated argument)."""
        if self._trained is None:
            self._trained = stream_dependence(self.g, self._params)
        return not self.is_dep(a) and not (isinstance(a, G.Value) and id(a) in self._trained)

    def residual(self, v):
        acc = self.acc.get(id(v))
        return self.ct[id(v)] if acc is None else self.ct[id(v)] - acc

    def set_known(self, v, ct):
        self.ct[id(v)] = None if ct is None else _up(ct)
        self.forward.append(v)
        if v.producer is not None and id(v.producer) not in self.resolved:
            self.backward.append(v.producer)

    def contribute(self, a, c):
        if not isinstance(a, G.Value) or c is None or not is_float(a.aval):
            return
        if getattr(c, "dtype", None) == jax.dtypes.float0:
            return
        if id(a) in self.dep:
            self.acc[id(a)] = _add(self.acc.get(id(a)), c)
        else:
            self.nacc[id(a)] = _add(self.nacc.get(id(a)), c)

    def block(self, v, node, error):
        if id(v) not in self.blocked:
            self.blocked[id(v)] = _Blocked(v, node, error)
            self.block_history.append(self.blocked[id(v)])

    # -- setup -------------------------------------------------------------------------

    def _constant_part(self):
        """Evaluate the non-stream nodes once; keep their pullback for the end."""
        g = self.g
        needed = []
        seen = set()
        for node in self.stream_nodes:
            for a in node.inputs:
                if isinstance(a, G.Value) and id(a) not in self.dep and id(a) not in seen:
                    seen.add(id(a))
                    needed.append(a)
        for o in g.outvars:
            if isinstance(o, G.Value) and id(o) not in self.dep and id(o) not in seen:
                seen.add(id(o))
                needed.append(o)
        for f in self._find_weights():  # the factors the sweep solves with
            if id(f) not in seen:
                seen.add(id(f))
                needed.append(f)
        diff_idx = [
            i for i, v in enumerate(g.invars) if not self.stream[i] and is_float(v.aval)
        ]
        const_nodes = [n for n in g.nodes if id(n) not in self.stream_ids]

        def const_fn(*diff_vals):
            env = {id(v): x for v, x in zip(g.invars, self.invals)}
            env.update({id(g.invars[i]): x for i, x in zip(diff_idx, diff_vals)})
            for node in const_nodes:
                ins = [a.val if isinstance(a, G.Lit) else env[id(a)] for a in node.inputs]
                env.update(zip(map(id, node.outputs), node.bind(*ins)))
            return [env[id(v)] for v in needed]

        vals, pullback = jax.vjp(const_fn, *[self.invals[i] for i in diff_idx])
        for v, x in zip(needed, vals):
            self.val[id(v)] = x
        for node in const_nodes:  # parameter dependence, for the head check
            if any(isinstance(a, G.Value) and id(a) in self.param_dep for a in node.inputs):
                self.param_dep.update(id(o) for o in node.outputs)
        return needed, diff_idx, pullback

    def _find_weights(self):
        """Find the weights of the solving steps and how the program builds them
        (``factors.weight_factors``); returns the factor values the sweep reads."""
        values = []
        for node in self.stream_nodes:
            rule = vijp_rules.get(node.primitive)
            if rule is None or not rule.solves:
                continue
            for a in node.inputs:
                if not isinstance(a, G.Value) or self.is_dep(a) or not is_float(a.aval):
                    continue
                self.solve_uses[id(a)] = self.solve_uses.get(id(a), 0) + 1
                if id(a) not in self.weights:
                    self.weights[id(a)] = weight_factors(a, self._concrete)
                    values += [f.value for f in self.weights[id(a)] or ()
                               if f.kind != "monomial" and isinstance(f.value, G.Value)]
        return values

    def _concrete(self, a):
        """The NumPy value of an operand that is a constant of the program (a literal,
        or an input known when the program is traced and not trained), else ``None``."""
        if isinstance(a, G.Lit):
            return np.asarray(a.val)
        i = self._invar_at.get(id(a))
        if i is None or not self._by_value[i]:
            return None
        return np.asarray(self.invals[i])

    def _weight(self, a, x):
        """The ``Weight`` a solving step's vijp gets for its operand ``a`` (value ``x``)."""
        chain = self.weights.get(id(a))
        factors = None if chain is None else [
            (f, None if f.kind == "monomial" else self.read(f.value)) for f in chain]
        return Weight(x, factors, self.factorisations.setdefault(id(a), {}))

    def _solved(self, node):
        """One solving step less for each of ``node``'s weights: a factorisation is
        dropped after the last step that solves with it."""
        for a in {id(a): a for a in node.inputs}.values():
            if id(a) in self.solve_uses:
                self.solve_uses[id(a)] -= 1
                if self.solve_uses[id(a)] == 0:
                    self.factorisations.pop(id(a), None)

    # -- main loop ---------------------------------------------------------------------

    def run(self):
        g = self.g
        needed, diff_idx, const_pullback = self._constant_part()
        for i, v in enumerate(g.invars):
            if self.stream[i]:
                self.val[id(v)] = self.invals[i]
        for v in [*g.invars, *(o for n in self.stream_nodes for o in n.outputs)]:
            if id(v) in self.dep:
                self.unresolved[id(v)] = list(v.uses)
        for i, v in enumerate(g.invars):
            if self.stream[i]:
                self.set_known(v, self._known_cts.get(i) if is_float(v.aval) else None)
        if self.head:
            (loss,) = g.outvars
            one = jnp.ones((), loss.aval.dtype)
            if self.is_dep(loss):
                self.set_known(loss, one)
                self.head_nodes.add(id(loss))  # a marker: uses of the loss are the head
            elif isinstance(loss, G.Value):
                self.nacc[id(loss)] = one
        else:
            for o in g.outvars:
                if self.is_dep(o) and is_float(o.aval):
                    if id(o) in self.out_pending:
                        raise SpineStructureError(
                            "a value is returned twice by a swept block; its cotangent "
                            "split between the two outputs is not unique"
                        )
                    self.out_pending.add(id(o))
        for o in getattr(self, "recorded_outputs", ()):
            cts = self._fragment(o.producer) if isinstance(o, G.Value) and o.producer else None
            if cts is not None:  # known up front: reverse mode resolves its producer
                _report("fragment", [o.producer], "recorded block output cotangent",
                        _float_bytes(o.producer))
                for out, c in zip(o.producer.outputs, cts):
                    if c is not None and id(out) not in self.ct:
                        self.ct[id(out)] = _up(c)
                self.out_cts[id(o)] = self.ct.get(id(o))
                self.out_pending.discard(id(o))
        self.settle()
        for node in self.stream_nodes:
            if node.primitive is lax.scan_p and self._try_scan(node):
                pass
            else:
                self._evaluate(node)
            self.settle()
        if not self.head and self.fragments is not None:
            self._record_outputs()
        self._finish()
        in_cts = [None] * len(g.invars)
        if diff_idx:
            cts = [_down(self.nacc.get(id(v)), v.aval) for v in needed]
            for i, c in zip(diff_idx, const_pullback(cts)):
                in_cts[i] = c
        outvals = [self.read(o) for o in g.outvars]
        out_cts = [self.out_cts.get(id(o)) if isinstance(o, G.Value) else None
                   for o in g.outvars]
        return outvals, out_cts, in_cts

    def _evaluate(self, node):
        invals = [self.read(a) for a in node.inputs]
        if any(is_float(o.aval) for o in node.outputs):
            outs, pullback = jax.vjp(lambda *xs: tuple(node.bind(*xs)), *invals)
            self.pullbacks[id(node)] = pullback
        else:
            outs = node.bind(*invals)
        for o, x in zip(node.outputs, outs):
            self.val[id(o)] = x
        self.evaluated.add(id(node))
        for o in node.outputs:
            if not is_float(o.aval):
                self.ct[id(o)] = None
        if not any(is_float(o.aval) for o in node.outputs):
            self._resolve(node, contributions=None)
        else:
            for a in node.inputs:
                if self.is_dep(a) and id(a) in self.ct:
                    self.forward.append(a)
            self.backward.append(node)
        # retried after the node's own resolution, which may reach them backwards
        self.forward.extend(self.wake.pop(id(node), []))

    def settle(self):
        """Resolve what reverse mode can before sweeping a value across its last use:
        a use whose output cotangents are all known (from the loss or a recorded
        fragment) is exact in reverse mode, while crossing it forwards would divide or
        solve — and fail where the step is not invertible (a masked autoregressive
        layer's weight, whose masked rows leave it singular)."""
        while self.backward or self.forward or self.stalled:
            if self.backward:
                self._try_backward(self.backward.popleft())
                continue
            if not self.forward:
                self.forward.append(self.stalled.pop(0))
            v = self.forward.popleft()
            if id(v) in self.ct and id(v) not in self.consumed:
                self._try_forward(v)

    # -- resolution --------------------------------------------------------------------

    def _pull(self, node, out_cts):
        """Contributions of ``node``'s output cotangents to its inputs."""
        pullback = self.pullbacks.pop(id(node), None)
        if pullback is None:
            return [None] * len(node.inputs)
        return list(pullback(tuple(_down(c, o.aval) for o, c in zip(node.outputs, out_cts))))

    def _resolve(self, node, contributions, skip=()):
        """Mark ``node`` resolved and hand its input contributions over."""
        self.resolved.add(id(node))
        self.pullbacks.pop(id(node), None)
        for pos, a in enumerate(node.inputs):
            if contributions is not None and id(a) not in skip:
                self.contribute(a, contributions[pos])
        for a in {id(a): a for a in node.inputs if self.is_dep(a)}.values():
            uses = self.unresolved[id(a)]
            uses[:] = [(n, p) for n, p in uses if n is not node]
            if id(a) in self.watch:
                self.forward.append(self.watch[id(a)])
            if id(a) in self.ct:
                self.forward.append(a)
            elif not uses and id(a) not in self.out_pending:
                # all uses accounted for: reverse mode gives its cotangent
                acc = self.acc.get(id(a))
                self.from_reverse.add(id(a))
                self.set_known(a, acc if acc is not None else _zeros(a.aval))

    def _try_backward(self, node):
        if id(node) in self.resolved or id(node) not in self.evaluated:
            return
        if not all(id(o) in self.ct for o in node.outputs):
            return
        if self.head and any(
            id(o) in self.head_nodes or any(id(n) in self.head_nodes for n, _ in o.uses)
            for o in node.outputs
        ):
            self.head_nodes.add(id(node))
        out_cts = [self.ct[id(o)] for o in node.outputs]
        _report("head" if id(node) in self.head_nodes else "side", [node])
        self._resolve(node, self._pull(node, out_cts))

    def _finish_output(self, v):
        self.out_cts[id(v)] = self.residual(v)
        self.out_pending.discard(id(v))

    def _try_forward(self, v):
        uses = self.unresolved.get(id(v), [])
        if id(v) in self.side_records:  # a recorded side output: checked, not swept
            if not uses and id(v) not in self.consumed:
                self._meet(v, self.ct[id(v)], self.acc.get(id(v)), "a recorded fragment")
                self.consumed.add(id(v))
            return
        if not uses:
            if id(v) in self.out_pending:
                self._finish_output(v)
            elif id(v) not in self.from_reverse and id(v) not in self.consumed:
                self._meet(v, self.ct[id(v)], self.acc.get(id(v)),
                           "the loss head" if self.head else "a side branch")
            self.consumed.add(id(v))  # a block record stays: reverse mode did the work
            return
        if self.ct[id(v)] is None:  # no cotangent to sweep (integer or boolean value)
            return
        nodes = list({id(n): n for n, _ in uses}.values())
        if id(v) in self.out_pending:
            self.block(v, nodes[0], equation_error(
                SpineStructureError, nodes[0],
                "a value that a swept block returns is also used inside the block",
                "return a copy from a separate invertible step, or use moonjax.custom_vijp"))
            return
        if any(id(n) not in self.evaluated for n in nodes):
            return  # wait until every use has been evaluated
        masked = self._mask_partition(v, nodes)
        if masked is not None:
            done = masked
        elif all(n.primitive in elementwise_rules for n in nodes):
            done = self._region(v, nodes)
        elif all(n.primitive is lax.slice_p for n in nodes):
            done = self._slices(v, nodes)
        elif len(nodes) == 1:
            done = self._rule(v, nodes[0])
        else:
            if self._record_escapes(v, nodes):
                return  # retried as the records resolve what it feeds
            first = min(nodes, key=lambda n: n.index)
            self.block(v, first, equation_error(
                SpineStructureError, first,
                f"a spine value feeds {len(nodes)} operations whose cotangents are all "
                f"unknown (also at {', '.join(where(n.source_info) for n in nodes[1:])}); "
                "the sweep can only cross one of them — e.g. a residual `x + f(x)` with a "
                "non-elementwise f is not invertible layer by layer",
                "use a coupling or RevBlock (moonjax.nn), or wrap the block in "
                "moonjax.custom_vijp"))
            return
        if done:
            self.consumed.add(id(v))
            self.blocked.pop(id(v), None)

    def _check_finite(self, node, g):
        if not self.debug or g is None:
            return
        msg = (f"{NON_FINITE} after `{node.primitive.name}` at "
               f"{where(node.source_info)} (a singular weight or a flat activation?)")

        def check(ok):
            if not bool(ok):
                raise FloatingPointError(msg)

        jax.debug.callback(check, jnp.all(jnp.isfinite(g)))

    def _meet(self, v, swept, exact, what):
        """The self-check: ``v``'s swept cotangent against an exact one (reverse mode's
        sum over its uses, or what a recorded fragment pulls back)."""
        if exact is None or swept is None or not is_float(v.aval):
            return
        if id(v) in self.divided:  # v = φ(u) read by no parameter: compare at u
            swept, dphi = self.divided.pop(id(v))
            exact = exact * dphi
        node = v.producer if v.producer is not None else (v.uses[0][0] if v.uses else None)
        at = where(node.source_info) if node is not None else "the network input"
        D.note(D.Meeting(what, at), swept, exact)

    def _fragment(self, node):
        """The recorded output cotangents of a non-submersive spine step, if any."""
        if isinstance(self.fragments, Collect):
            self.fragments[node.index] = [o.aval if is_float(o.aval) else None
                                          for o in node.outputs]
            return [jnp.zeros(o.aval.shape, o.aval.dtype) if is_float(o.aval) else None
                    for o in node.outputs]
        if self.fragments is not None and node.index in self.fragments:
            return self.fragments[node.index]
        return None

    def _layers_ahead(self, v) -> bool:
        """Whether what ``v`` feeds reads trained parameters (more layers to sweep), as
        opposed to a loss head, which reverse mode differentiates at the end."""
        stack, seen = [u for u, _ in v.uses], set()
        while stack:
            m = stack.pop()
            if id(m) in seen:
                continue
            seen.add(id(m))
            if any(isinstance(a, G.Value) and id(a) in self.param_dep for a in m.inputs):
                return True
            stack.extend(u for o in m.outputs for u, _ in o.uses)
        return False

    def _record_escapes(self, v, nodes, shrink: bool = False) -> bool:
        """The fallback for a step with no rule (a residual ``h + f(h)``, a masked
        autoregressive transformer, a side output such as a log-determinant that reaches
        the loss outside the spine): take phase 1's record of the cotangents of the
        values that leave what ``v`` feeds, so that reverse mode resolves it locally.

        First the values reached through some of ``v``'s uses but not all (side outputs:
        checked when their uses are, not swept onwards); if that is not enough, the
        step's outputs (reached through all of them: swept onwards from the record).
        With ``shrink``, a side output as large as ``v`` that elementwise steps or
        reductions read next is not recorded yet: ``v`` is retried once they have been
        evaluated, so that the record is what they reduce it to (a masked coupling's
        log-determinant, summed after its mask).
        Returns whether records were taken (the caller retries ``v`` as they resolve)."""
        if self.fragments is None or not self.head or not self._layers_ahead(v):
            # in a loop body, waiting is local to one layer: its outputs' records (at
            # the end of the body) resolve it; in the loss head, reverse mode does
            return False
        tier = self.escape_tier.get(id(v), 0)
        reach: dict[int, tuple] = {}
        for k, n in enumerate(nodes):
            stack, seen = [n], set()
            while stack:
                m = stack.pop()
                if id(m) in seen or id(m) not in self.evaluated:
                    continue
                seen.add(id(m))
                for o in m.outputs:
                    reach.setdefault(id(o), (o, set()))[1].add(k)
                    stack.extend(u for u, _ in o.uses)
        escapes = [(o, ks) for o, ks in reach.values()
                   if is_float(o.aval) and id(o) not in self.ct
                   and id(o) not in self.out_pending
                   and any(id(u) not in self.evaluated for u, _ in o.uses)]
        side = [o for o, ks in escapes if len(ks) < len(nodes)]
        step = [o for o, ks in escapes if len(ks) == len(nodes)]
        chosen = side if tier == 0 and side else step if tier < 2 else []
        if not chosen:
            return False
        if shrink and chosen is side:
            later = [u for o in side if o.aval.size >= v.aval.size for u, _ in o.uses
                     if id(u) not in self.evaluated]
            if later and all(u.primitive in elementwise_rules
                             or u.primitive.name.startswith("reduce_") for u in later):
                for u in later:
                    self.wake.setdefault(id(u), []).append(v)
                return False
        self.escape_tier[id(v)] = 1 if chosen is side else 2
        taken = False
        for producer in {id(o.producer): o.producer for o in chosen}.values():
            cts = self._fragment(producer)
            if cts is None:
                return False
            kind = "side output" if chosen is side else "step output"
            _report("fragment", [producer], f"recorded {kind} cotangent (no rule)",
                    _float_bytes(producer))
            for o, c in zip(producer.outputs, cts):
                if c is not None and id(o) not in self.ct:
                    if chosen is side:
                        self.side_records.add(id(o))
                    self.set_known(o, c)
                    taken = True
        if taken:
            self.stalled.append(v)  # retried once what the records resolve has settled
        return taken

    def _cross_with_fragment(self, v, node) -> bool:
        """Cross ``node`` with the exact output cotangents that phase 1 recorded."""
        if all(id(o) in self.ct for o in node.outputs):  # e.g. the loss: reverse mode
            self._try_backward(node)
            return id(node) in self.resolved
        out_cts = self._fragment(node)
        if out_cts is None:
            return False
        _report("fragment", [node], "recorded output cotangent", _float_bytes(node))
        contributions = self._pull(node, out_cts)
        exact = None
        for a, c in zip(node.inputs, contributions):
            if a is v and c is not None:
                exact = _add(exact, c)
        self._meet(v, self.ct[id(v)], _add(self.acc.get(id(v)), exact), "a recorded fragment")
        self._resolve(node, contributions, skip={id(v)})
        for o, c in zip(node.outputs, out_cts):
            if id(o) not in self.ct:
                self.set_known(o, c)
        self.consumed.add(id(v))
        return True

    def _rule(self, v, node):
        rule = vijp_rules.get(node.primitive)
        custom = G.CUSTOM_BLOCKS.get(node.params.get("name")) if node.primitive.name in (
            "jit", "pjit") else None
        if custom is not None:
            rule = custom
        if rule is None:
            if self._cross_with_fragment(v, node):
                return True
            self.block(v, node, equation_error(
                UnsupportedPrimitiveError, node,
                f"no vijp rule for primitive `{node.primitive.name}` on the spine",
                "register one with moonjax.register_vijp, wrap the block in "
                "moonjax.custom_vijp, or build the layer from moonjax.nn modules"))
            return False
        if custom is not None:
            positions = list(range(custom.spine_arity))
        elif rule.merge:
            positions = [p for p, a in enumerate(node.inputs) if self.is_dep(a)]
        else:
            positions = [p for p, a in enumerate(node.inputs) if a is v]
        if len({id(node.inputs[p]) for p in positions}) != len(positions):
            self.block(v, node, equation_error(
                SpineStructureError, node,
                "one spine value enters the same operation twice",
                "make the operation read the value once"))
            return False
        reason = rule.check(node, positions) if rule.check is not None else None
        if reason is not None:
            if self._cross_with_fragment(v, node):
                return True
            self.block(v, node, equation_error(
                NotSubmersiveError, node, f"layer is not submersive: {reason}",
                "use an invertible or dimension-lowering layer here (see moonjax.nn), "
                "or write its vijp with moonjax.custom_vijp"))
            return False
        spine = [node.inputs[p] for p in positions]
        for a in spine:
            if not self.is_dep(a) or id(a) not in self.ct:
                return False  # wait for the other spine operands
            others = [n for n, _ in self.unresolved[id(a)] if n is not node]
            if others:
                return False
        invals = [self.read(a) for a in node.inputs]
        if rule.solves:
            invals = [self._weight(a, x) if p not in positions and id(a) in self.weights
                      else x for p, (a, x) in enumerate(zip(node.inputs, invals))]
        g_ins = [self.residual(a) for a in spine]
        out_cts = rule.vijp(node, positions, g_ins, invals)
        if rule.solves:
            self._solved(node)
        _report("spine", [node], getattr(rule.vijp, "__qualname__", "custom"))
        if node.primitive.name in SOLVES:
            D.amplifier(f"solves with the weight of `{node.primitive.name}` at "
                        f"{where(node.source_info)}")
        contributions = self._pull(node, out_cts)
        self._resolve(node, contributions, skip={id(a) for a in spine})
        for o, c in zip(node.outputs, out_cts):
            self._check_finite(node, c)
            if id(o) not in self.ct:
                self.set_known(o, c)
        for a in spine:
            self.consumed.add(id(a))
        return True

    def _slices(self, v, nodes):
        part = slice_partition(nodes, v.aval)
        if part is None:
            self.block(v, nodes[0], equation_error(
                NotSubmersiveError, nodes[0],
                "slices of a spine value that do not partition it: the dropped entries "
                "leave a cokernel",
                "slice into pieces that together cover the value (or use jnp.split)"))
            return False
        axis, pieces = part
        _report("spine", nodes, "slice partition")
        g = self.residual(v)
        for start, stop, node in pieces:
            self._resolve(node, None)
            self.set_known(node.outputs[0], lax.slice_in_dim(g, start, stop, axis=axis))
        return True

    # -- masks as partitions ------------------------------------------------------------

    def _mask_partition(self, v, nodes):
        """A masked coupling: ``y = where(m, v, T(v; c))`` with ``T`` elementwise in ``v``
        and its conditioner ``c`` reading ``v`` through masked copies ``where(m, v, 0)``
        only, for masks ``m`` that are functions of neither the network input nor the
        trained parameters (``is_mask``). The mask
        partitions ``v`` as a split does: where ``y`` takes ``T``, ``v``'s cotangent comes
        from ``T`` alone (``g_T = g_v / T'``), and once that has been pulled back through
        the conditioner to the masked copies, where ``y`` takes ``v`` its cotangent is
        what is left of ``g_v``. Returns ``None`` where the pattern does not apply (the
        other rules take ``v``), else whether ``v`` was crossed. That every masked copy
        reads ``v`` only where ``y`` takes ``v`` is checked at run time: the cotangent is
        NaN otherwise (the drift check then refuses the gradient)."""
        if id(v) in self.merges:  # the second half, once the masked copies resolved
            merge, takes_v, g_t = self.merges[id(v)]
            if [id(n) for n in nodes] != [id(merge)]:
                # the conditioner's side outputs (a log-determinant) may need records
                self._record_escapes(v, nodes, shrink=True)
                return False
            g_y = jnp.where(takes_v, self.residual(v), g_t)
            self._resolve(merge, None)
            _report("spine", [merge], "mask partition")
            self.set_known(merge.outputs[0], g_y)
            del self.merges[id(v)]
            return True
        found = self._masked_coupling(v, nodes)
        if found is None:
            return self._masked_product(v, nodes)
        merge, slot, t, order, copies = found
        takes_v = self.read(merge.inputs[0]) == (slot - 1)
        ok = jnp.all(functools.reduce(jnp.logical_and, [
            jnp.where(self.read(n.inputs[0]) == (k - 1), takes_v, True)
            for n, k in copies]))
        g_t = self._cross_masked(v, t, order, takes_v, ok)
        self.merges[id(v)] = (merge, takes_v, g_t)
        return False  # v is crossed once the masked copies have resolved

    def _cross_masked(self, v, t, order, takes_v, ok):
        """Cross ``T`` (the elementwise steps ``order`` from ``v`` to ``t``) where the
        mask does not keep ``v``: ``g_T = g_v / T'`` there, zero where it keeps ``v``
        (NaN everywhere unless ``ok``). Its pullback reaches the conditioner; ``t``'s
        cotangent is final. Returns it."""
        inside = {id(v), *(id(o) for n in order for o in n.outputs)}
        backprop = functools.partial(self._backprop_region, order, inside, v, t)
        if ct_dtype(v.aval.dtype) != v.aval.dtype:  # 16-bit: T' in float32
            dphi = self._derivative(v, t, order)
        else:
            dphi, _ = backprop(jnp.ones(t.aval.shape, t.aval.dtype))
        g = self.residual(v)
        g_t = jnp.where(takes_v, jnp.zeros_like(g), g / jnp.where(takes_v, 1, dphi))
        g_t = jnp.where(ok, g_t, jnp.asarray(jnp.nan, g_t.dtype))
        self._check_finite(order[-1], g_t)
        if any(n.primitive.name not in SHIFTS for n in order):
            D.amplifier(self._divides(order))
        g_v, outside = backprop(g_t)
        self.contribute(v, g_v)
        values = {id(a): a for n in order for a in n.inputs if isinstance(a, G.Value)}
        for k, c in outside.items():
            self.contribute(values[k], c)
        for n in order:
            for o in n.outputs:
                if id(o) not in self.ct:
                    self.ct[id(o)] = None  # internal to T: nothing to sweep
                    self.consumed.add(id(o))
            self._resolve(n, None)
        self.ct[id(t)] = _up(g_t)  # T's share of the merge's cotangent: final
        self.consumed.add(id(t))
        _report("region", order, "masked elementwise region g / T'(x)")
        return g_t

    def _masked_product(self, v, nodes):
        """The same coupling with its mask written as products: ``c = v * m`` read by
        the conditioner, ``y = c + w * T(v; c)`` with ``m`` and ``w`` not functions of
        the input. It is a partition where ``m`` is 0 or 1 and ``w = 1 - m``, which is
        checked at run time (NaN otherwise). Returns ``None`` where the pattern does not
        apply, else whether ``v`` was crossed."""
        if id(v) in self.products:  # the second half, once the conditioner resolved
            copy, merge, scaled, takes_v, g_t = self.products[id(v)]
            c = copy.outputs[0]
            rest = [n for n, _ in self.unresolved[id(c)]]
            if [id(n) for n in nodes] != [id(copy)] or [id(n) for n in rest] != [id(merge)]:
                self._record_escapes(v, rest or nodes, shrink=True)
                return False
            acc = self.acc.get(id(c))
            kept = self.residual(v) if acc is None else self.residual(v) - acc
            g_y = jnp.where(takes_v, kept, g_t)
            for n in (copy, scaled, merge):
                for o in n.outputs:
                    if id(o) not in self.ct and o is not merge.outputs[0]:
                        self.ct[id(o)] = None
                        self.consumed.add(id(o))
                self._resolve(n, None)
            _report("spine", [copy, merge], "mask partition")
            self.set_known(merge.outputs[0], g_y)
            del self.products[id(v)]
            return True
        found = self._product_coupling(v, nodes)
        if found is None or found == "wait":
            return None if found is None else False
        copy, merge, scaled, t, order, m, w = found
        m, w = self.read(m), self.read(w)
        ok = jnp.all(((m == 0) | (m == 1)) & (w == 1 - m))
        takes_v = m == 1
        g_t = self._cross_masked(v, t, order, takes_v, ok)
        self.products[id(v)] = (copy, merge, scaled, takes_v, g_t)
        self.watch[id(copy.outputs[0])] = v  # retried as the conditioner resolves
        return False

    def _transform(self, v, starts, t, merge):
        """The elementwise steps from ``v`` (its uses ``starts``) up to ``t``, in program
        order, if they are a masked coupling's ``T``: evaluated, of ``v``'s shape, their
        values read by one another or (``t``) by ``merge`` only, and one-to-one in ``v``.
        ``None`` otherwise."""
        order, stack, seen = [], list(starts), set()
        while stack:
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.primitive not in elementwise_rules or id(n) not in self.evaluated \
                    or len(n.outputs) != 1 or n.outputs[0].aval.shape != v.aval.shape:
                return None
            order.append(n)
            if n.outputs[0] is not t:
                stack.extend(u for u, _ in n.outputs[0].uses)
        order.sort(key=lambda n: n.index)
        ids = {id(n) for n in order}
        if t.producer is None or id(t.producer) not in ids:
            return None
        for n in order:
            for o in n.outputs:
                if any(id(u) not in ids and not (u is merge and o is t) for u, _ in o.uses):
                    return None
            flags = [isinstance(a, G.Value) and (a is v or a.producer is not None
                                                 and id(a.producer) in ids)
                     for a in n.inputs]
            if elementwise_rules[n.primitive](n, flags) is not None:
                return None  # T' may vanish: not this rule
        return order

    def _product_coupling(self, v, nodes):
        """``(copy, merge, scaled, T, T's nodes, m, w)`` for ``_masked_product``."""
        def factor(n, x):  # the other operand of ``x * factor``, if not input-dependent
            if n.primitive is not lax.mul_p or len(n.inputs) != 2:
                return None
            others = [a for a in n.inputs if a is not x]
            if len(others) != 1 or not self.is_mask(others[0]) or not isinstance(
                    others[0], G.Value) or others[0].aval.ndim != v.aval.ndim or any(
                    a not in (1, b) for a, b in zip(others[0].aval.shape, v.aval.shape)):
                return None  # an array the size of v, or broadcast along its size-1 axes
            return others[0]

        copies = [(n, m) for n in nodes if (m := factor(n, v)) is not None]
        if len(copies) != 1:
            return None
        ((copy, m),) = copies
        c = copy.outputs[0]
        merges = [n for n, _ in c.uses if n.primitive is lax.add_p]
        if len(merges) != 1 or all(n is merges[0] for n, _ in c.uses):
            return None  # no conditioner reads c: an elementwise region, not a coupling
        (merge,) = merges
        q = [a for a in merge.inputs if a is not c]
        if len(q) != 1 or not isinstance(q[0], G.Value) or q[0].producer is None:
            return None
        scaled = q[0].producer
        ts = [a for a in scaled.inputs if self.is_dep(a)]
        w = factor(scaled, ts[0]) if len(ts) == 1 else None
        if w is None or len(q[0].uses) != 1:
            return None
        t = ts[0]
        later = [n for n in (scaled, merge) if id(n) not in self.evaluated]
        if later:  # the merge comes after v's uses: look again once it is evaluated
            for n in later:
                self.wake.setdefault(id(n), []).append(v)
            return "wait"
        order = self._transform(v, [n for n in nodes if n is not copy], t, scaled)
        if order is None:
            return None
        return copy, merge, scaled, t, order, m, w

    def _backprop_region(self, order, inside, v, y, g_y):
        """Reverse mode through the elementwise region ``order`` from ``y``'s cotangent
        ``g_y``: ``(v's cotangent, {id: contribution} of the values read from outside)``;
        ``inside`` holds the ids of ``v`` and the region's values."""
        local = {id(y): g_y}
        outside = {}
        for n in reversed(order):
            cts = [local.get(id(o)) for o in n.outputs]
            if all(c is None for c in cts):
                continue
            ins = self.pullbacks[id(n)](tuple(_down(c, o.aval) for o, c in zip(n.outputs, cts)))
            for a, c in zip(n.inputs, ins):
                if isinstance(a, G.Value) and is_float(a.aval):
                    target = local if id(a) in inside else outside
                    target[id(a)] = _add(target.get(id(a)), c)
        return local.get(id(v)), outside

    def _divides(self, order) -> str:
        """What crossing the elementwise region ``order`` does to rounding (for the drift
        message): a product with an array that does not depend on the input is named, as
        a 0/1 mask written as a product makes the division infinite."""
        text = (f"divides by the derivative of "
                f"{'/'.join(dict.fromkeys(n.primitive.name for n in order))} at "
                f"{where(order[0].source_info)}")
        if any(n.primitive is lax.mul_p and any(
                isinstance(a, G.Value) and not self.is_dep(a) and a.aval.ndim > 0
                for a in n.inputs) for n in order):
            text += (" (a product with an array that may be zero: a 0/1 mask is crossed "
                     "as a partition in a coupling, c = h * m read by the conditioner and "
                     "y = c + (1 - m) * T(h), or written as jnp.where(mask, h, T(h)))")
        return text

    def _masked_coupling(self, v, nodes):
        """``(merge, v's case, T, T's nodes in order, [(masked copy, v's case)])`` if
        ``v``'s uses form a masked coupling (see ``_mask_partition``), else None."""
        def select(n):  # a two-way select_n by a mask that is no function of the input
            return (n.primitive is lax.select_n_p and len(n.inputs) == 3
                    and self.is_mask(n.inputs[0])
                    and n.inputs[0].aval.shape == v.aval.shape)

        copies, merges = [], []
        for n in nodes:
            if not select(n):
                continue
            slots = [k for k in (1, 2) if n.inputs[k] is v]
            if len(slots) != 1:
                return None
            other = n.inputs[3 - slots[0]]
            (copies if not self.is_dep(other) else merges).append((n, slots[0]))
        if len(merges) != 1 or not copies:
            return None
        (merge, slot), = merges
        t = merge.inputs[3 - slot]
        if t.producer is None or id(t.producer) not in self.evaluated:
            return None
        masks = {id(n) for n, _ in [*copies, *merges]}
        order = self._transform(v, [n for n in nodes if id(n) not in masks], t, merge)
        if order is None:
            return None
        expected = {id(merge), *(id(n) for n, _ in copies),
                    *(id(n) for n in order if any(a is v for a in n.inputs))}
        if {id(n) for n in nodes} != expected:
            return None
        return merge, slot, t, order, copies

    def _region(self, v, nodes):
        """Cross a connected region of elementwise primitives with input ``v``."""
        # Grow the region in program order, one node at a time, until a single float
        # value carries everything it computed: the first value every path from v
        # passes through (values used twice inside, nested calls, custom_jvp bodies).
        region = {id(n): n for n in nodes}
        while True:
            frontier = []
            expand = {}
            for n in region.values():
                for o in n.outputs:
                    outside = [u for u, _ in o.uses if id(u) not in region]
                    if is_float(o.aval) and (outside or any(x is o for x in self.g.outvars)):
                        frontier.append(o)
                        for u in outside:
                            expand[id(u)] = u
            if len(frontier) == 1:
                break
            first = min(region.values(), key=lambda n: n.index)
            nxt = min(expand.values(), key=lambda n: n.index) if expand else None
            if not frontier or nxt is None or nxt.primitive not in elementwise_rules:
                if self.fragments is not None and self.head and self._layers_ahead(v):
                    uses = list({id(n): n for n, _ in self.unresolved[id(v)]}.values())
                    later = [u for u in uses if id(u) not in self.evaluated]
                    for u in later:
                        self.wake.setdefault(id(u), []).append(v)
                    if later or self._record_escapes(v, uses):
                        return False
                self.block(v, first, equation_error(
                    NotSubmersiveError, first,
                    "an elementwise map of a spine value has several outputs that feed "
                    "different layers, so it is not one-to-one onto any one of them",
                    "feed one layer from the activation, or use moonjax.custom_vijp"))
                return False
            if id(nxt) not in self.evaluated:  # retry once it has been evaluated
                self.wake.setdefault(id(nxt), []).append(v)
                return False
            region[id(nxt)] = nxt
        (y,) = frontier
        order = sorted(region.values(), key=lambda n: n.index)
        inside = {id(v)}
        failure = None
        shape_failure = False
        for n in order:
            flags = [isinstance(a, G.Value) and id(a) in inside for a in n.inputs]
            if any(is_float(o.aval) and o.aval.shape != v.aval.shape for o in n.outputs):
                shape_failure = True
                failure = failure or equation_error(
                    NotSubmersiveError, n,
                    "an elementwise step changes the shape of a spine value (broadcast)",
                    "keep spine activations at one shape through elementwise layers")
            reason = elementwise_rules[n.primitive](n, flags)
            if reason is not None:
                failure = failure or equation_error(
                    NotSubmersiveError, n, f"layer is not submersive: {reason}",
                    "use a strictly monotone activation (leaky_relu, tanh, …) on the spine, "
                    "or let mode='mixed' record the erased cotangent (fragments=True)")
            inside.update(id(o) for o in n.outputs)
        if failure is not None and not shape_failure and derivative_sign(
                order, v, y, self.read) is not None:
            failure = None  # φ' provably never vanishes (softplus, ELU, CELU, …)
        fragment = None
        if failure is not None:
            later = [u for u, _ in y.uses if id(u) not in self.evaluated]
            if later or id(y) in self.ct:
                # wait: reverse mode from the loss may reach y first (a loss head such
                # as sum(h ** 2) needs no record), then it resolves the region backwards
                for u in later:
                    self.wake.setdefault(id(u), []).append(v)
                return False
            fragment = self._fragment(y.producer)
            if fragment is None:
                self.block(v, order[0], failure)
                return False
            fragment = fragment[[id(o) for o in y.producer.outputs].index(id(y))]

        backprop = functools.partial(self._backprop_region, order, inside, v, y)

        if fragment is None:
            if ct_dtype(v.aval.dtype) != v.aval.dtype:  # 16-bit: φ' in float32
                dphi = self._derivative(v, y, order)
            else:
                dphi, _ = backprop(jnp.ones(y.aval.shape, y.aval.dtype))
            g_y = self.residual(v) / dphi
            self._check_finite(order[-1], g_y)
            if not any(self.is_param(a) for n in order for a in n.inputs):
                # no parameter reads g_y here: if reverse mode meets y, compare on the
                # input side, where a division by a vanishing φ' did no harm
                self.divided[id(y)] = (self.residual(v), dphi)
            if any(n.primitive.name not in SHIFTS for n in order):
                D.amplifier(self._divides(order))
        else:
            g_y = fragment
            _report("fragment", [y.producer], "recorded output cotangent",
                    y.aval.size * y.aval.dtype.itemsize)
        g_v, outside = backprop(g_y)
        if fragment is not None:
            self._meet(v, self.ct[id(v)], _add(self.acc.get(id(v)), g_v), "a recorded fragment")
        values = {id(a): a for n in order for a in n.inputs if isinstance(a, G.Value)}
        for k, c in outside.items():
            self.contribute(values[k], c)
        for n in order:
            for o in n.outputs:
                if o is not y and id(o) not in self.ct:
                    self.ct[id(o)] = None  # internal to the region: nothing to sweep
                    self.consumed.add(id(o))
            self._resolve(n, None)
        _report("region", order, "elementwise region g / φ'(x)")
        self.set_known(y, g_y)
        return True

    def _derivative(self, v, y, order):
        """φ'(x) of an elementwise region, evaluated in the cotangent dtype (float32 for
        16-bit models, where φ' rounds to 0 as soon as e.g. tanh saturates)."""

        def phi(x):
            env = {id(v): x}
            for n in order:
                ins = [env[id(a)] if isinstance(a, G.Value) and id(a) in env
                       else _up(self.read(a)) for a in n.inputs]
                if n.primitive is lax.convert_element_type_p and is_float(n.outputs[0].aval):
                    outs = [_up(ins[0])]
                else:
                    outs = n.bind(*ins)
                env.update(zip(map(id, n.outputs), outs))
            return env[id(y)]

        x = _up(self.read(v))
        return jax.jvp(phi, (x,), (jnp.ones_like(x),))[1]

    # -- scan --------------------------------------------------------------------------

    def _try_scan(self, node):
        sweep_scan = LOOPS[lax.scan_p]
        p = node.params
        nc, ncar = p["num_consts"], p["num_carry"]
        carry = node.inputs[nc:nc + ncar]
        xs = node.inputs[nc + ncar:]
        if any(self.is_dep(a) for a in xs):
            return False
        stream_pos = [i for i, a in enumerate(carry) if self.is_dep(a)]
        if len({id(carry[i]) for i in stream_pos}) != len(stream_pos):
            return False
        for i in stream_pos:
            a = carry[i]
            if id(a) not in self.ct or self.ct[id(a)] is None:
                return False
            if any(n is not node for n, _ in self.unresolved[id(a)]):
                return False
        invals = [self.read(a) for a in node.inputs]
        g_carry = {i: self.residual(carry[i]) for i in stream_pos if is_float(carry[i].aval)}
        outer, inner = REPORT.get(), [] if REPORT.get() is not None else None
        token = REPORT.set(inner)
        try:
            if isinstance(self.fragments, Collect):
                nested = self.fragments.setdefault(node.index, Collect())
            else:
                nested = (self.fragments or {}).get(node.index)
            anchors = None
            if isinstance(nested, dict) and "anchors" in nested:
                anchors = (nested["k"], nested["anchors"])
                nested = nested["body"]
            outs, out_cts, in_cts = sweep_scan(node, invals, g_carry, self.debug, nested,
                                               anchors)
            if isinstance(self.fragments, Collect) and not nested:
                del self.fragments[node.index]
        finally:
            REPORT.reset(token)
        if outer is not None:
            outer.append(Step("scan", (node,), "scan of the body's sweep", 0, tuple(inner)))
        for o, x in zip(node.outputs, outs):
            self.val[id(o)] = x
        self.evaluated.add(id(node))
        self._resolve(node, in_cts, skip={id(carry[i]) for i in stream_pos})
        for i in stream_pos:
            self.consumed.add(id(carry[i]))
        for o, c in zip(node.outputs, out_cts):
            if id(o) not in self.ct:
                self.set_known(o, c)
        return True

    # -- the end -----------------------------------------------------------------------

    def _raise_blocked(self, fallback: str, history: bool = False):
        records = list(self.blocked.values()) or (self.block_history if history else [])
        if records:
            raise min(records, key=lambda b: b.order).error
        raise SpineStructureError(fallback)

    def _record_outputs(self):
        """Outputs of a swept block whose cotangent the sweep cannot find forwards (a
        per-layer loss term read from a side branch, e.g. a flow's log-det) take it
        from phase 1's record; reverse mode then resolves the branch that made them."""
        for v in self.g.outvars:
            if not isinstance(v, G.Value) or id(v) not in self.out_pending or id(v) in self.ct:
                continue
            node = v.producer
            if node is None or id(node) not in self.evaluated or id(node) in self.resolved:
                continue
            cts = self._fragment(node)
            if cts is None:
                continue
            _report("fragment", [node], "recorded block output cotangent", _float_bytes(node))
            for o, c in zip(node.outputs, cts):
                if c is not None and id(o) not in self.ct:
                    self.set_known(o, c)
            self.settle()

    def _finish(self):
        pending = [n for n in self.stream_nodes if id(n) not in self.resolved]
        if pending or self.out_pending:
            where_ = where(pending[0].source_info) if pending else "the block's outputs"
            self._raise_blocked(
                f"the sweep could not determine every cotangent (first stuck near {where_})")
        if self.head:
            for node in self.stream_nodes:
                if id(node) in self.head_nodes and any(
                    isinstance(a, G.Value) and id(a) in self.param_dep for a in node.inputs
                ):
                    self._raise_blocked(
                        "the loss head reads trained parameters after the last swept value; "
                        f"`{node.primitive.name}` at {where(node.source_info)}", history=True)
