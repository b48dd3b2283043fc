"""Layers written as a Python loop: the straight-line program cut where its spine
narrows, and reversible backprop over the runs of pieces that invert.

Most programs have no ``lax.scan`` over layers: an ``nnx.List`` of modules, a Linen
``@nn.compact`` loop, a list of Equinox modules, a ``distrax.Chain`` trace to one long
straight-line program. ``segments`` cuts it where the values that later layers
depend on through (the *spine*, the stream-dependent values still to be read) weigh
least: at a layer's output, where a coupling's halves meet again. The piece between two
cuts is a ``Segment``. Consecutive segments that rebuild their input from their
output by additions, moves and elementwise divisions (couplings, permutations) form a
``Run``, which ``reversible_run`` differentiates as reversible backprop: the
forward pass keeps the run's output (and its spine every ``anchor_every`` segments),
and going back each segment's input is rebuilt by its inverse
(``moonjax._src.inverse``) and its vjp taken, one segment at a time.

Unrolled code has no loop to sequence it: XLA is free to run every inversion before the
first vjp and keep all the rebuilt inputs alive, as much as ``jax.grad`` keeps. Each
segment's backward step therefore runs under a ``lax.cond`` whose predicate reads the
cotangent the later segment produced: a real data dependence, so a segment's input is
rebuilt only once the segment after it is done.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moonjax._src import drift as D
from moonjax._src import graph as G
from moonjax._src.errors import where
from moonjax._src.inverse import Inversion, invert, plan_inversion
from moonjax._src.sweep import is_float

# Primitives that only move entries: a segment of these alone is joined to the next
# one (a split or concatenate between two layers is not a layer of its own).
MOVES = {lax.split_p, lax.concatenate_p, lax.slice_p, lax.reshape_p, lax.squeeze_p,
         lax.broadcast_in_dim_p, lax.transpose_p, lax.rev_p, lax.copy_p,
         lax.convert_element_type_p}

# a run with fewer layers (segments with a dot_general or a convolution) keeps about
# what reverse mode keeps: left to reverse mode
MIN_RUN = 2
LAYER_PRIMITIVES = {"dot_general", "conv_general_dilated"}

# a run is inverted only where it is estimated to keep at most this fraction of what
# reverse mode keeps for it (both estimates are rough at small sizes: a margin)
RUN_MARGIN = 0.7

# how many candidate cuts a segment may reach past to find one over which it inverts
REACH = 8

# the default recomputes a block exactly where its rebuilt input drifted beyond this
# many units of the spine's epsilon (measured: see docs/fidelity.md)
RECOMPUTE_ULPS = 16

# ``anchor_every="auto"``: the spine kept every k segments of a run, where the rebuilt
# input is checked and the inversion restarts (rounding grows over k segments at most),
# with k near sqrt(segments x the spine / a segment's activations) as checkpointing
# chooses its blocks (the default recomputes a drifting block exactly, holding its
# activations), at most RUN_ANCHOR
RUN_ANCHOR = 16


def auto_anchor(segs, residuals: int) -> int:
    """``anchor_every="auto"`` for a run of ``segs`` whose segments each keep about
    ``residuals`` bytes in reverse mode: the blocks' kept spines and one block's
    residuals (what its exact recompute holds) weigh about the same."""
    spine = sum(value_bytes(v) for v in segs[0].ins)
    k = round(math.sqrt(len(segs) * spine / max(1, residuals)))
    return max(2, min(RUN_ANCHOR, k))


def kept_bytes(segs, k: int | None, residuals: int) -> int:
    """Estimated bytes a run keeps: its spine at every block's start and at its end,
    one segment's residuals while it is inverted, and one block's while it is
    recomputed (the default's fallback)."""
    spine = sum(value_bytes(v) for v in segs[0].ins)
    k = k or len(segs)
    return (-(-len(segs) // k) + 2) * spine + (k + 1) * residuals


def residual_bytes(seg: Segment) -> int:
    """The bytes reverse mode keeps for ``seg``: the residuals of its vjp (shapes only,
    under ``jax.eval_shape``), the arrays it reads from outside excluded."""
    produced = {id(o) for n in seg.nodes for o in n.outputs}
    spine = {id(v) for v in seg.ins}
    ext = list({id(a): a for n in seg.nodes for a in n.inputs if isinstance(a, G.Value)
                and id(a) not in produced and id(a) not in spine}.values())
    sds = lambda v: jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype)

    def f(h, e):
        env = dict(zip(map(id, ext), e))
        env.update(zip(map(id, seg.ins), h))
        G.run_nodes(seg.nodes, env)
        return [env[id(v)] for v in seg.outs]

    def held(h, e):
        fe = [i for i, v in enumerate(ext) if is_float(v.aval)]
        def of_floats(h, fv):
            e2 = list(e)
            for i, v in zip(fe, fv):
                e2[i] = v
            return f(h, e2)
        _, pullback = jax.vjp(of_floats, h, [e[i] for i in fe])
        given = {id(t) for t in jax.tree_util.tree_leaves((h, e))}
        return [r for r in jax.tree_util.tree_leaves(pullback) if id(r) not in given]

    out = jax.eval_shape(held, [sds(v) for v in seg.ins], [sds(v) for v in ext])
    return int(sum(r.size * r.dtype.itemsize for r in out))


@dataclasses.dataclass(frozen=True, eq=False)
class Segment:
    """The stream-dependent equations between two cuts: ``ins`` is the spine at its
    start (every earlier value read from here on), ``outs`` the spine at its end."""

    nodes: tuple
    ins: tuple
    outs: tuple
    inversion: Inversion

    @property
    def invertible(self) -> bool:
        """Whether its input is rebuilt from its output without solves or Newton steps
        (additions, moves, elementwise divisions by values it computes)."""
        return (self.inversion.stuck is None and self.inversion.divides_only
                and all(is_float(v.aval) for v in (*self.ins, *self.outs)))

    @property
    def where(self) -> str:
        return where(self.nodes[0].source_info)


@dataclasses.dataclass(frozen=True, eq=False)
class Run:
    """Consecutive invertible segments: reversible backprop keeps ``outs`` only (and
    the spine every ``anchor_every`` segments)."""

    segments: tuple
    anchor_every: int | None

    @property
    def nodes(self) -> tuple:
        return tuple(n for s in self.segments for n in s.nodes)

    @property
    def ins(self) -> tuple:
        return self.segments[0].ins

    @property
    def outs(self) -> tuple:
        return self.segments[-1].outs

    @property
    def externals(self) -> tuple:
        """What the run reads from outside it besides its spine: parameters, constants,
        values computed from them."""
        inner = {id(o) for n in self.nodes for o in n.outputs} | {id(v) for v in self.ins}
        found = {}
        for n in self.nodes:
            for a in n.inputs:
                if isinstance(a, G.Value) and id(a) not in inner:
                    found.setdefault(id(a), a)
        return tuple(found.values())

    @property
    def amplifier(self):
        """The first move of its inverse that can amplify rounding (``None``: additions
        and moves only)."""
        return next((s.inversion.amplifier for s in self.segments
                     if s.inversion.amplifier is not None), None)

    @property
    def where(self) -> str:
        return self.segments[0].where

    def describe(self) -> str:
        how = ("adds and moves" if self.amplifier is None
               else self.amplifier.describe())
        anchored = (f", the spine kept every {self.anchor_every} segments"
                    if self.anchor_every else "")
        return (f"{len(self.segments)} unrolled segments from {self.where} invert "
                f"(the inverse {how}){anchored}")


def segments(graph: G.Graph, dep: set) -> list[Segment]:
    """The stream-dependent part of ``graph`` (``dep``: ids of the values that depend on
    the network input), cut where its spine weighs least.

    The candidate cuts are the boundaries between two stream-dependent equations where
    the live stream-dependent values weigh no more than at the boundary before. From
    each cut the segment reaches the nearest later candidate at which the spine weighs
    no more and over which the equations invert (a side branch can have narrow points
    of its own: the segment goes past them), trying ``REACH`` candidates; a segment
    that does not invert reaches the next candidate only. Segments of moves alone are
    joined to the next."""
    sd = [n for n in graph.nodes
          if any(isinstance(a, G.Value) and id(a) in dep for a in n.inputs)]
    if not sd:
        return []
    at = {id(n): t for t, n in enumerate(sd)}
    end = len(sd)
    outputs = {id(v) for v in graph.outvars if isinstance(v, G.Value)}
    spans = []  # (value, first boundary it is live at, last)
    for v in [*graph.invars, *(o for n in sd for o in n.outputs)]:
        if id(v) not in dep:
            continue
        born = 0 if v.producer is None else at[id(v.producer)] + 1
        last = max((at[id(n)] for n, _ in v.uses if id(n) in at), default=-1)
        if id(v) in outputs:
            last = end
        if last >= born:
            spans.append((v, born, last))
    weight = [0] * (end + 2)
    for v, born, last in spans:
        weight[born] += value_bytes(v)
        weight[last + 1] -= value_bytes(v)
    for t in range(1, end + 1):
        weight[t] += weight[t - 1]
    cuts = [0] + [t for t in range(1, end) if weight[t] <= weight[t - 1]] + [end]

    def spine(t):
        return tuple(v for v, born, last in spans if born <= t <= last)

    def piece(i, j):
        return _segment(tuple(sd[cuts[i]:cuts[j]]), spine(cuts[i]), spine(cuts[j]))

    found, i = [], 0
    while i < len(cuts) - 1:
        first = {id(n) for n in sd[cuts[i]:cuts[i + 1]]}
        narrower = [j for j in range(i + 1, len(cuts)) if weight[cuts[j]] <= weight[cuts[i]]]
        for j in narrower[:REACH]:
            seg = piece(i, j)
            if seg.invertible:
                break
            if id(_obstacle(seg)) in first:  # every longer segment meets it too
                j = None
                break
        else:
            j = None
        if j is None:
            j = i + 1
            seg = piece(i, j)
        if found and _moves_only(found[-1]):  # moves alone: joined to the next piece
            before = found.pop()
            seg = _segment(before.nodes + seg.nodes, before.ins, seg.outs)
        found.append(seg)
        i = j
    if len(found) > 1 and _moves_only(found[-1]):
        last, before = found.pop(), found.pop()
        found.append(_segment(before.nodes + last.nodes, before.ins, last.outs))
    return found


def _obstacle(seg: Segment):
    """The equation that keeps ``seg`` from inverting without solves or Newton steps:
    the one with no inverse, or the first amplifying move that is not a division."""
    if seg.inversion.stuck is not None:
        return seg.inversion.stuck
    return next((m.node for m in seg.inversion.moves if not m.preserving and not (
        m.kind == "rule" and m.node.primitive in (lax.mul_p, lax.div_p))), None)


def _moves_only(seg: Segment) -> bool:
    return all(n.primitive in MOVES for n in seg.nodes)


def _with_private(nodes, ins) -> tuple:
    """``nodes`` and the parameter-only equations that feed them alone and whose
    outputs weigh at least their inputs (a bias broadcast to the batch, a weight
    transposed): recomputed with the segment instead of kept as its input. A slice of
    stacked weights stays outside: the segment keeps its layer's slice, not the stack
    (whose cotangent would be a zero-padded copy of the stack per segment)."""
    inside = {id(n) for n in nodes}
    spine = {id(v) for v in ins}
    pulled = True
    while pulled:
        pulled = False
        for n in list(nodes):
            for a in n.inputs:
                p = a.producer if isinstance(a, G.Value) else None
                if (p is not None and id(a) not in spine and id(p) not in inside
                        and p.primitive.name != "scan"
                        and sum(map(value_bytes, p.outputs)) >= sum(
                            value_bytes(b) for b in p.inputs if isinstance(b, G.Value))
                        and all(id(u) in inside for u, _ in a.uses)
                        and all(all(id(u) in inside for u, _ in o.uses) for o in p.outputs)):
                    nodes = (*nodes, p)
                    inside.add(id(p))
                    pulled = True
    return tuple(sorted(nodes, key=lambda n: n.index))


def _segment(nodes, ins, outs) -> Segment:
    nodes = _with_private(nodes, ins)
    produced = {id(o) for n in nodes for o in n.outputs}
    known = {id(v) for v in outs}
    known.update(id(a) for n in nodes for a in n.inputs
                 if isinstance(a, G.Value) and id(a) not in produced
                 and not any(a is v for v in ins))
    targets = [v for v in ins if id(v) not in known]
    return Segment(nodes, ins, outs,
                   plan_inversion(G.Graph([], [], list(nodes)), known, targets))


def runs(graph: G.Graph, dep: set, anchor_every=None) -> list[Run]:
    """The runs of consecutive invertible segments with ``MIN_RUN`` layers or more
    (segments with a ``LAYER_PRIMITIVES`` equation). For ``anchor_every="auto"``
    (the default), only those estimated to keep at most ``RUN_MARGIN`` times what
    reverse mode keeps for them (``kept_bytes``, ``residual_bytes`` of their
    middle segment), anchored by ``auto_anchor``; an int or ``None`` anchors every
    run so (``mode="reversible"``)."""
    found, current = [], []
    for seg in [*segments(graph, dep), None]:
        if seg is not None and seg.invertible and not any(
                n.primitive.name == "scan" for n in seg.nodes):
            current.append(seg)
            continue
        layers = sum(any(n.primitive.name in LAYER_PRIMITIVES for n in s.nodes)
                     for s in current)
        if layers >= MIN_RUN:
            if anchor_every != "auto":  # forced: the caller's interval, no estimate
                found.append(Run(tuple(current), anchor_every))
            else:
                residuals = residual_bytes(current[len(current) // 2])
                k = auto_anchor(current, residuals)
                if kept_bytes(current, k, residuals) <= RUN_MARGIN * len(current) * residuals:
                    found.append(Run(tuple(current), k))
        current = []
    return found


def value_bytes(v) -> int:
    """The bytes of a graph value (0 for a token or other non-array)."""
    aval = v.aval
    return int(getattr(aval, "size", 0)) * getattr(getattr(aval, "dtype", None),
                                                   "itemsize", 0)


def _after(g, fn, operands, like):
    """``fn(*operands)`` once the cotangent ``g`` is computed: under a ``lax.cond`` on
    a predicate read from ``g`` (false where ``g`` is NaN: the outputs, shaped like
    the arrays ``like``, are NaN then, as they would be), so XLA cannot schedule it
    earlier."""
    probe = jnp.ravel(g)[0]
    nan = lambda: jax.tree_util.tree_map(lambda x: jnp.full_like(x, jnp.nan), like)
    return lax.cond(probe == probe, lambda ops: fn(*ops), lambda ops: nan(), operands)


def recompute_tolerance(dtype) -> float:
    """The drift of a rebuilt block input beyond which the default recomputes the block
    exactly: ``RECOMPUTE_ULPS`` units of the spine's epsilon."""
    return float(RECOMPUTE_ULPS * np.finfo(dtype).eps)


def reversible_run(run: Run, recompute: bool = False):
    """The run as a ``custom_vjp`` function ``(ins, externals) -> outs`` (lists of
    values of ``run.ins``, ``run.externals``, ``run.outs``) whose backward pass rebuilds
    each segment's input by inverting it and takes the segment's vjp.

    The forward pass keeps the run's output, and its spine every ``k`` segments
    (``run.anchor_every``): blocks of ``k`` segments, each starting at a kept spine
    (the first at the run's input). Going back through a block, its rebuilt input is
    measured against the kept one (the self-check) and the kept one is used from
    there on: rounding grows over one block at most. With ``recompute`` (the
    default's choice), a block whose rebuilt input drifted beyond
    ``recompute_tolerance`` is differentiated again exactly, as reverse mode
    from its kept input (its ``k`` spines held while it runs, under a ``lax.cond``:
    only the calls that need it pay), and nothing is reported; without, the drift is
    reported (``moonjax._src.drift.note_value``) for the guard to refuse."""
    segs, ext_vars, k = run.segments, run.externals, run.anchor_every
    starts = [s for s in range(len(segs)) if s == 0 or (k and s % k == 0)]
    blocks = list(zip(starts, [*starts[1:], len(segs)]))
    meeting = D.Meeting(
        "the run's input" if len(blocks) == 1 else f"the spine kept every {k} segments",
        run.where, measured="the input rebuilt by inverting every unrolled layer")
    graphs = [G.Graph([], [], list(seg.nodes)) for seg in segs]
    uses = [[i for i, v in enumerate(ext_vars) if any(a is v for n in seg.nodes
                                                      for a in n.inputs)] for seg in segs]
    reads = [[i for i in u if is_float(ext_vars[i].aval)] for u in uses]  # differentiated
    fns = segment_functions(segs, [[ext_vars[i] for i in u] for u in uses])

    def forward(ins, ext, keep=()):
        env = dict(zip(map(id, ext_vars), ext))
        env.update(zip(map(id, run.ins), ins))
        kept = []
        for s, seg in enumerate(segs):
            if s in keep:
                kept.append([env[id(v)] for v in seg.ins])
            G.run_nodes(seg.nodes, env)
        return [env[id(v)] for v in run.outs], kept

    @jax.custom_vjp
    def call(ins, ext):
        return forward(ins, ext)[0]

    def fwd(ins, ext):
        outs, kept = forward(ins, ext, set(starts[1:]))
        return outs, (ins, ext, outs, kept)

    def bwd(res, g_outs):
        ins, ext, outs, kept = res
        ext_at = dict(zip(map(id, ext_vars), ext))

        def seg_vjp(s, h_in, g_out):
            """The cotangents of segment ``s``'s input and of the externals it reads."""
            mine, used = reads[s], uses[s]
            fn = fns[s]

            def f(h, e_vals):
                e = dict(zip(mine, e_vals))
                return fn(h, [e[i] if i in e else ext[i] for i in used])

            _, pullback = jax.vjp(f, h_in, [ext[i] for i in mine])
            g_in, g_e = pullback(g_out)
            return g_in, dict(zip(mine, g_e))

        def inverted(s, h_out):
            """Segment ``s``'s input rebuilt from its output."""
            seg = segs[s]
            known = dict(ext_at)
            known.update(zip(map(id, seg.outs), h_out))
            targets = [v for v in seg.ins if id(v) not in known]
            known.update(zip(map(id, targets), invert(graphs[s], known, targets,
                                                      seg.inversion)))
            return [known[id(v)] for v in seg.ins]

        def computed(a, b, h_in):
            """The inputs of segments ``a + 1 .. b - 1`` computed forwards from ``h_in``."""
            inputs = []
            for s in range(a, b - 1):
                h_in = fns[s](h_in, [ext[i] for i in uses[s]])
                inputs.append(h_in)
            return inputs

        def vjps(a, b, input_of, h, g):
            """The vjps of segments ``b - 1 .. a``, each at ``input_of(s, h)`` (``h``:
            the later segment's input): the cotangents of block ``[a, b)``'s input and
            of the externals it reads, and the first segment's input."""
            g_ext = {}
            for s in reversed(range(a, b)):
                h = input_of(s, h)
                g, part = seg_vjp(s, h, g)
                for i, c in part.items():
                    g_ext[i] = c if i not in g_ext else g_ext[i] + c
            return g, g_ext, h

        def block(a, b, exact, h_out, g_out):
            """Block ``[a, b)`` going back from its output: each segment's input
            rebuilt by inversion and its vjp taken at it (XLA computes what the two
            share once), then the rebuilt input of the block measured against the kept
            one. With ``recompute``, a block that drifted is differentiated again
            exactly, its inputs computed forwards from the kept one. Returns the
            cotangents of its input and of the externals it reads, and the drift."""
            g, g_ext, rebuilt = vjps(a, b, inverted, h_out, g_out)
            drift = max_drift(rebuilt, exact)
            if recompute:
                tol = min(recompute_tolerance(jnp.result_type(v)) for v in exact)

                def again(_):
                    inputs = [exact, *computed(a, b, exact)]
                    return vjps(a, b, lambda s, h: inputs[s - a], None, g_out)[:2]

                # NaN compares false: a drift too
                g, g_ext = lax.cond(~(drift <= tol), again, lambda _: (g, g_ext), None)
            return g, g_ext, drift

        exact_at = dict(zip(starts, [ins, *kept]))
        h, g, g_ext, drifts = list(outs), list(g_outs), {}, []
        for a, b in reversed(blocks):
            reads_ab = sorted({i for s in range(a, b) for i in reads[s]})
            like = (exact_at[a], {i: ext[i] for i in reads_ab},
                    jnp.zeros((), jnp.result_type(float)))
            g, part, drift = _after(g[0], functools.partial(block, a, b),
                                    (exact_at[a], h, g), like)
            drifts.append(drift)
            for i, c in part.items():
                g_ext[i] = c if i not in g_ext else g_ext[i] + c
            h = exact_at[a]
        if recompute:
            tol = min(recompute_tolerance(jnp.result_type(v)) for v in ins)
            D.note_recomputes(meeting, sum((~(d <= tol)).astype(jnp.int32) for d in drifts),
                              len(blocks))
        else:
            D.note_value(meeting, jnp.max(jnp.stack(drifts)))
            if run.amplifier is not None:
                D.amplifier(run.amplifier.describe())
        g_ext_all = [jnp.zeros_like(x) if is_float(jax.typeof(x)) else
                     np.zeros(jnp.shape(x), jax.dtypes.float0) for x in ext]
        for i, c in g_ext.items():
            g_ext_all[i] = c
        return g, g_ext_all

    call.defvjp(fwd, bwd)
    return call


def segment_functions(segs, externals) -> list:
    """For each segment, a jitted ``(inputs, externals) -> outputs`` (``externals``:
    the values it reads from outside, in the given order), one function for all the
    segments of the same structure (primitives, parameters, wiring): each segment's vjp
    is then traced once per structure, not once per segment and use (a deep stack of
    identical layers, differentiated on the main path and in each block's exact
    recompute, is traced once)."""
    made: dict = {}
    fns = []
    for seg, ext in zip(segs, externals):
        key = _structure(seg, ext)
        fn = None if key is None else made.get(key)
        if fn is None:
            fn = jax.jit(functools.partial(_run_segment, seg, tuple(ext)))
            if key is not None:
                made[key] = fn
        fns.append(fn)
    return fns


def _run_segment(seg, ext_vars, ins, ext):
    env = dict(zip(map(id, ext_vars), ext))
    env.update(zip(map(id, seg.ins), ins))
    G.run_nodes(seg.nodes, env)
    return [env[id(v)] for v in seg.outs]


def _structure(seg, ext_vars):
    """A hashable description of what ``seg`` computes from its inputs and ``ext_vars``
    (``None`` where a parameter or literal is not hashable: no sharing)."""
    at = {id(v): ("in", j) for j, v in enumerate(seg.ins)}
    at.update({id(v): ("ext", j, v.aval) for j, v in enumerate(ext_vars)})
    nodes = []
    for k, node in enumerate(seg.nodes):
        refs = []
        for a in node.inputs:
            if isinstance(a, G.Lit):  # by its bytes: -0.0 is not 0.0, a NaN is itself
                refs.append(("lit", np.asarray(a.val).tobytes(), a.aval))
            else:
                refs.append(at[id(a)])
        for j, o in enumerate(node.outputs):
            at[id(o)] = ("node", k, j)
        nodes.append((node.primitive, tuple(sorted(node.params.items())), tuple(refs)))
    key = (tuple(v.aval for v in seg.ins), tuple(nodes),
           tuple(at[id(v)] for v in seg.outs))
    try:
        hash(key)
    except TypeError:
        return None
    return key


def max_drift(rebuilt, exact):
    """The largest relative difference between rebuilt and exact spine values."""
    return jnp.max(jnp.stack([D.relative(r, e).astype(jnp.result_type(float))
                              for r, e in zip(rebuilt, exact)]))
