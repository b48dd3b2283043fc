"""Phase 1 of Moonwalk: the exact cotangent ``g₀`` of the stream, for the sweep.

* ``mixed``: a reverse pass for the input cotangent only (see ``api``): parameters are
  constants, so it stores what the input vjp needs (weights, sign masks), not the
  activations the parameter gradients would need. The loops that invert run by
  inversion (``moonjax._src.reversible``): one carry kept. Records of the exact
  cotangent are taken where the sweep needs them (fragments, anchors).
* ``forward``: forward-mode JVPs, one per entry of the input, one at a time. Nothing is
  stored; time grows with the size of the input. With independent examples
  (``batch_axis=0``), one JVP per feature moves every example at once, and the loss
  head (where examples meet) is differentiated in reverse mode.

Reverse mode for every cotangent (no sweep) is ``moonjax._src.reverse``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from moonjax._src import graph as G
from moonjax._src import masks
from moonjax._src.errors import BATCH_MIXED, ArgumentError, where
from moonjax._src.reversible import reversible_scan
from moonjax._src.sweep import is_float, stream_dependence


def forward(graph, invals, stream_pos, collected=None):
    """``(outvals, g_stream, recorded)`` by one JVP per entry of the stream and of the
    fragments ``collected`` (the spine steps the sweep cannot cross, as
    ``mixed_with_probes`` takes them): no residuals at all. A zero is added at
    each fragment and its cotangent, the record, comes from the JVPs as the stream's
    does (``recorded`` is ``None`` without fragments)."""
    probes = _probes(graph, collected) if collected else {}

    def f(stream_vals, probe_vals):
        vals = list(invals)
        for i, s in zip(stream_pos, stream_vals):
            vals[i] = s
        return _evaluate_probed(graph, vals, probe_vals, packed=False)

    primals = ([invals[i] for i in stream_pos], probes)
    outs = f(*primals)
    leaves, tree = jax.tree_util.tree_flatten(primals)
    grads = []
    for k, leaf in enumerate(leaves):
        size = math.prod(np.shape(leaf))

        def directional(j, k=k, leaf=leaf, size=size):
            tangents = [jnp.zeros_like(t) for t in leaves]
            tangents[k] = jax.nn.one_hot(j, size, dtype=jnp.result_type(leaf)).reshape(
                np.shape(leaf))
            return jax.jvp(lambda *v: f(*jax.tree_util.tree_unflatten(tree, v))[0],
                           leaves, tangents)[1]

        grads.append(lax.map(directional, jnp.arange(size)).reshape(np.shape(leaf)))
    g_stream, recorded = jax.tree_util.tree_unflatten(tree, grads)
    return outs, g_stream, recorded if collected else None


def forward_batched(graph, invals, stream_pos, debug=False):
    """``forward`` for independent examples along axis 0 of every stream input.

    The *cut* is where the batch ends: the stream-dependent values with the batch as
    their leading axis that feed an operation whose result is no longer per example
    (the loss's mean, a contraction over the batch). Up to the cut, example ``b``'s
    values depend on example ``b``'s input only, so one JVP with feature ``j`` of every
    example moved at once gives ``∂cut[b]/∂x[b, j]`` for all ``b``; the cut's cotangent
    comes from reverse mode over the head alone, and ``g[b, j]`` is their inner product.
    Probe JVPs that move part of the batch check the claim: if a cut value of an example
    that did not move changes, the gradient is NaN (``debug=True``: an error).
    """
    stream_vals = [invals[i] for i in stream_pos]
    sizes = {np.shape(s)[0] if np.ndim(s) else None for s in stream_vals}
    if len(sizes) != 1 or None in sizes:
        raise ArgumentError(
            "batch_axis=0 needs every network input to have the same leading batch "
            f"size; got shapes {[tuple(np.shape(s)) for s in stream_vals]}")
    (batch,) = sizes
    dep = stream_dependence(graph, [i in stream_pos for i in range(len(invals))])
    per_example = lambda v: (isinstance(v, G.Value) and id(v) in dep
                             and tuple(v.aval.shape[:1]) == (batch,))
    cut, seen, meets, region = [], set(), [], set()
    for node in graph.nodes:
        ins = [a for a in node.inputs if isinstance(a, G.Value) and id(a) in dep]
        if not ins:
            continue
        if all(map(per_example, ins)) and all(map(per_example, node.outputs)):
            region.add(id(node))  # still per example
            continue
        meets.append(node)
        for a in ins:
            if per_example(a) and id(a) not in seen:
                cut.append(a)
                seen.add(id(a))

    def run(*stream_in, cut_in=None):
        vals = list(invals)
        for i, s in zip(stream_pos, stream_in):
            vals[i] = s
        env = {}

        def bind(node, args):
            if cut_in is not None and id(node) in region:
                # the head's view: the cut values come from outside, and the rest of the
                # per-example region feeds only the region, so it is not evaluated again
                outs = [cut_in.get(id(o)) for o in node.outputs]
            else:
                outs = node.bind(*args)
                if cut_in is not None:
                    outs = [cut_in.get(id(o), x) for o, x in zip(node.outputs, outs)]
            env.update((id(o), x) for o, x in zip(node.outputs, outs))
            return outs

        if cut_in is not None:
            vals = [cut_in.get(id(v), x) for v, x in zip(graph.invars, vals)]
        env.update((id(v), x) for v, x in zip(graph.invars, vals))
        outs = G.evaluate(graph, vals, bind)
        return outs, [env[id(c)] for c in cut]

    outs, cut_vals = run(*stream_vals)
    if not cut:
        return outs, [jnp.zeros_like(s) for s in stream_vals]
    _, head_pullback = jax.vjp(
        lambda *cv: run(*stream_vals, cut_in=dict(zip(map(id, cut), cv)))[0][0], *cut_vals)
    cut_cts = head_pullback(jnp.ones_like(outs[0]))

    def cut_tangents(tangents):
        return jax.jvp(lambda *v: run(*v)[1], stream_vals, tangents)[1]

    def per_example_dot(ts):
        return sum(jnp.sum((c * t).reshape(batch, -1), -1) for c, t in zip(cut_cts, ts)
                   if c is not None and jnp.issubdtype(c.dtype, jnp.inexact))

    # the probes: move the examples whose index has bit k set (then clear), in a fixed
    # generic direction; a value of any other example that moves is exact evidence of
    # mixing, and 2 * ceil(log2 batch) probes separate every pair of examples
    rng = np.random.default_rng(0)
    direction = [jnp.asarray(rng.standard_normal(np.shape(s)), jnp.result_type(s))
                 for s in stream_vals]
    bits = (batch - 1).bit_length()

    def probe(kb):
        moved = ((jnp.arange(batch) >> (kb // 2)) & 1) == (kb % 2)
        mask = lambda a, m: jnp.where(m.reshape((batch,) + (1,) * (a.ndim - 1)), a, 0)
        ts = cut_tangents([mask(d, moved) for d in direction])
        return sum(jnp.sum(jnp.abs(mask(t, ~moved))) for t in ts
                   if jnp.issubdtype(t.dtype, jnp.inexact))

    leak = jnp.sum(lax.map(probe, jnp.arange(2 * bits))) if bits else 0.0
    independent = leak == 0
    if debug:
        msg = (f"{BATCH_MIXED}: moving some examples of the input changed other "
               f"examples' values before the batch meets at {where(meets[0].source_info)}; "
               "drop batch_axis (one JVP per input entry) or use mode='mixed'")

        def check(ok):
            if not bool(ok):
                raise FloatingPointError(msg)

        jax.debug.callback(check, independent)
    grads = []
    for k, s in enumerate(stream_vals):
        shape, features = np.shape(s), math.prod(np.shape(s)[1:])

        def directional(j, k=k, s=s, shape=shape, features=features):
            tangents = [jnp.zeros_like(t) for t in stream_vals]
            e_j = jax.nn.one_hot(j, features, dtype=jnp.result_type(s))
            tangents[k] = jnp.broadcast_to(e_j, (batch, features)).reshape(shape)
            return per_example_dot(cut_tangents(tangents))

        g = lax.map(directional, jnp.arange(features)).T.reshape(shape)
        grads.append(jnp.where(independent, g, jnp.nan).astype(s.dtype))
    return outs, grads


def _probes(graph: G.Graph, collected, leading=(), anchors=None):
    """Zeros shaped like the fragments ``collected`` (stacked over enclosing loops),
    and, for the loops in ``anchors`` (``node.index -> (k, carry positions)``), one
    zero per block of ``k`` steps on each swept carry."""
    probes = {}
    for node in graph.nodes:
        entry = collected.get(node.index)
        plan = (anchors or {}).get(node.index)
        if entry is None and plan is None:
            continue
        if node.primitive is lax.scan_p and not isinstance(entry, list):
            # a loop the sweep crosses step by step (a list: one fragment of the whole
            # loop's outputs, a loop it cannot enter, as any other node)
            body, _ = G.flatten(node.params["jaxpr"])
            length = node.params["length"]
            inner = _probes(body, entry or {}, leading + (length,))
            if plan is not None:
                k, positions = plan
                nc = node.params["num_consts"]
                inner = {"body": inner, "anchors": [
                    jnp.zeros((length // k,) + node.inputs[nc + i].aval.shape,
                              node.inputs[nc + i].aval.dtype) for i in positions]}
            probes[node.index] = inner
        else:
            probes[node.index] = [None if a is None else jnp.zeros(leading + a.shape, a.dtype)
                                  for a in entry]
    return probes


def _evaluate_probed(graph, invals, probes, anchors=None, inverted=None, packed=True):
    """Evaluate ``graph`` for mixed phase 1: probes added where records are taken,
    ``select_n`` masks kept bit-packed (``moonjax._src.masks``), and every loop
    evaluated step by step so that its body gets the same treatment. The loops in
    ``inverted`` (``node.index -> LoopBody``) that record nothing are run by inversion
    instead (``reversible_scan``, anchored as ``"auto"`` says): their phase 1
    keeps one carry. ``packed=False`` (forward mode: JVPs, which a ``custom_vjp``
    does not take) keeps ``select_n`` as it is."""

    def bind(node, args):
        entry = probes.get(node.index)
        if node.index in (inverted or {}) and not entry:
            return reversible_scan(node, inverted[node.index], "auto")(args)
        if node.primitive is lax.scan_p and not isinstance(entry, list):
            return loop(node, args, entry or {})
        if packed and node.primitive is lax.select_n_p and len(args) == 3 and masks.packable(
                node.inputs[0].aval, [a.aval for a in node.inputs[1:]]):
            outs = [masks.select(*args)]
        elif entry is None:
            return None
        else:
            outs = node.bind(*args)
        return outs if entry is None else [o if e is None else o + e
                                           for o, e in zip(outs, entry)]

    def loop(node, args, entry):
        p = node.params
        nc, ncar = p["num_consts"], p["num_carry"]
        body, body_consts = G.flatten(p["jaxpr"])

        def step(carry, inputs):
            x, pr = inputs
            outs = _evaluate_probed(body, [*body_consts, *args[:nc], *carry, *x], pr,
                                    packed=packed)
            return outs[:ncar], outs[ncar:]

        init, xs = list(args[nc:nc + ncar]), list(args[nc + ncar:])
        if "anchors" not in entry:
            carry, ys = lax.scan(step, init, (xs, entry), length=p["length"],
                                 reverse=p["reverse"], unroll=p["unroll"])
            return [*carry, *ys]
        k, positions = anchors[node.index]
        first = k - 1 if p["reverse"] else 0  # a block's first step, in loop order
        probes_ = entry["anchors"]

        def anchored(carry, inputs):
            # one loop, not a loop of blocks: a nested loop would make reverse mode
            # keep a copy of every step's weights; here they are the loop's own xs
            i, x, pr = inputs
            carry = list(carry)
            for pos, a in zip(positions, probes_):
                a = lax.dynamic_index_in_dim(a, i // k, keepdims=False)
                # its cotangent: the exact carry cotangent at the start of the block
                carry[pos] = carry[pos] + jnp.where(i % k == first, a, jnp.zeros_like(a))
            return step(carry, (x, pr))

        carry, ys = lax.scan(anchored, init, (jnp.arange(p["length"]), xs, entry["body"]),
                             length=p["length"], reverse=p["reverse"])
        return [*carry, *ys]

    return G.evaluate(graph, invals, bind)


def interval(k: int | None, length: int) -> int | None:
    """The largest divisor of ``length`` not above ``k`` (``None``: no anchors)."""
    if k is None:
        return None
    k = max(d for d in range(1, min(k, length) + 1) if length % d == 0)
    return k if k < length else None


def anchor_plan(graph: G.Graph, stream_pos, anchor_every: int) -> dict:
    """``node.index -> (k, swept carry positions)`` for the top-level loops over the
    stream; ``k`` is the largest divisor of the loop length not above ``anchor_every``."""
    stream = [i in stream_pos for i in range(len(graph.invars))]
    dep = stream_dependence(graph, stream)
    plan = {}
    for node in graph.nodes:
        if node.primitive is not lax.scan_p:
            continue
        p = node.params
        nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
        positions = [i for i, a in enumerate(node.inputs[nc:nc + ncar])
                     if isinstance(a, G.Value) and id(a) in dep and is_float(a.aval)]
        k = interval(anchor_every, length)
        if positions and k is not None:
            plan[node.index] = (k, positions)
    return plan


def mixed_with_probes(graph, invals, stream_pos, collected, anchors=None, inverted=None):
    """Mixed phase 1 that also records exact cotangents the sweep will use: the
    output cotangents of the non-submersive spine steps in ``collected`` (the
    fragments the sweep cannot recover) and, for the loops in ``anchors``, the carry
    cotangent at the start of every block. A zero is added at each such value, and
    its cotangent is the record. The loops in ``inverted`` are run by inversion (see
    ``_evaluate_probed``)."""
    probes = _probes(graph, collected, anchors=anchors)

    def f(stream_vals, probe_vals):
        vals = list(invals)
        for i, s in zip(stream_pos, stream_vals):
            vals[i] = s
        outs = _evaluate_probed(graph, vals, probe_vals, anchors, inverted)
        return outs[0], outs[1:]

    loss, pullback, aux = jax.vjp(f, [invals[i] for i in stream_pos], probes, has_aux=True)
    g_stream, recorded = pullback(jnp.ones_like(loss))
    for idx, (k, _) in (anchors or {}).items():
        recorded[idx]["k"] = k
    return [loss, *aux], list(g_stream), recorded
