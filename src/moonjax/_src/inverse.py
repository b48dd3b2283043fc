"""Inverting a layer: rebuild its input from its output (the ``reversible`` mode).

``invert(graph, known, targets)`` propagates known values through a flattened layer in
whichever direction they are known, like an inverse interpreter: a node whose inputs
are all known is evaluated (side branches, parameter-only code); a node whose outputs
are known and which has one unknown input is inverted with a rule from
``inverse_rules``. An elementwise region that reaches its output by several paths
(``leaky_relu`` is ``select_n(x >= 0, x, a*x)``) is inverted as one map by Newton
steps started at its output, which are exact for sign-preserving piecewise-linear maps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from moonjax._src import graph as G
from moonjax._src.errors import NotSubmersiveError, equation_error, where
from moonjax._src.rules import elementwise_rules
from moonjax._src.rules.linear import solve_right
from moonjax._src.rules.monotone import derivative_sign

NEWTON_STEPS = 3

# primitive -> rule(node, pos, y, invals) -> the value of input ``pos`` given output
# ``y`` and the other inputs (``invals[pos]`` is ``None``).
inverse_rules: dict = {}


def _unary(f):
    return lambda node, pos, y, invals: f(y, node)


for _p, _f in {
    lax.exp_p: lambda y, n: jnp.log(y),
    lax.log_p: lambda y, n: jnp.exp(y),
    lax.tanh_p: lambda y, n: jnp.arctanh(y),
    lax.logistic_p: lambda y, n: jnp.log(y) - jnp.log1p(-y),
    lax.sinh_p: lambda y, n: jnp.arcsinh(y),
    lax.asinh_p: lambda y, n: jnp.sinh(y),
    lax.atan_p: lambda y, n: jnp.tan(y),
    lax.log1p_p: lambda y, n: jnp.expm1(y),
    lax.expm1_p: lambda y, n: jnp.log1p(y),
    lax.neg_p: lambda y, n: -y,
    lax.sqrt_p: lambda y, n: y * y,
    lax.cbrt_p: lambda y, n: y * y * y,
    lax.copy_p: lambda y, n: y,
    lax.erf_p: lambda y, n: lax.erf_inv(y),
    lax.integer_pow_p: lambda y, n: jnp.sign(y) * jnp.abs(y) ** (1.0 / n.params["y"]),
    lax.convert_element_type_p: lambda y, n: y.astype(n.inputs[0].aval.dtype),
    lax.reshape_p: lambda y, n: jnp.reshape(y, n.inputs[0].aval.shape),
    lax.squeeze_p: lambda y, n: jnp.reshape(y, n.inputs[0].aval.shape),
    lax.broadcast_in_dim_p: lambda y, n: jnp.reshape(y, n.inputs[0].aval.shape),
    lax.transpose_p: lambda y, n: jnp.transpose(
        y, [n.params["permutation"].index(i) for i in range(y.ndim)]),
    lax.rev_p: lambda y, n: lax.rev(y, n.params["dimensions"]),
}.items():
    inverse_rules[_p] = _unary(_f)


def _add(node, pos, y, invals):
    return y - invals[1 - pos]


def _sub(node, pos, y, invals):
    return y + invals[1] if pos == 0 else invals[0] - y


def _mul(node, pos, y, invals):
    return y / invals[1 - pos]


def _div(node, pos, y, invals):
    return y * invals[1] if pos == 0 else invals[0] / y


def _dot_general(node, pos, y, invals):
    from moonjax._src.rules.linear import _layout

    x_aval, w_aval, xc, wc, xb, x_free, w_free = _layout(node, pos)
    k = 1
    for d in xc:
        k *= x_aval.shape[d]
    w = invals[1 - pos]
    wm = jnp.transpose(w, wc + w_free).reshape(k, -1)
    if wm.shape[1] != k or xb:
        raise equation_error(NotSubmersiveError, node,
                             "reversible mode needs a square weight to rebuild the input",
                             "use mode='mixed' for layers that change the width")
    m_shape = [x_aval.shape[d] for d in x_free]
    nm = len(m_shape)
    if pos == 1:  # output layout is (w_free..., x_free...): move x_free first
        nw = y.ndim - nm
        y = jnp.transpose(y, list(range(nw, nw + nm)) + list(range(nw)))
    ym = y.reshape(-1, k)
    xm = solve_right(wm.astype(ym.dtype), ym, transpose=False)  # x_mat @ wm = y_mat
    perm = x_free + xc
    x_t = xm.reshape(m_shape + [x_aval.shape[d] for d in xc])
    return jnp.transpose(x_t, [perm.index(i) for i in range(len(perm))])


def _gather(node, pos, y, invals):
    """A permutation ``y = take(x, perm, axis)``: ``x = take(y, argsort(perm), axis)``
    (NaN if ``perm`` is not a permutation, checked at run time)."""
    from moonjax._src.rules.structural import checked_permutation, permutation_axis

    axis, reason = permutation_axis(node)
    if pos != 0 or reason is not None:
        raise equation_error(NotSubmersiveError, node,
                             f"reversible mode cannot rebuild the input of this `gather`: "
                             f"{reason or 'its indices depend on the network input'}",
                             "gather a permutation of one axis, or use mode='mixed'")
    perm = invals[1][:, 0]
    x = jnp.take(y, jnp.argsort(perm), axis=axis)
    return checked_permutation(node, perm, y.shape[axis], x)


inverse_rules.update({lax.add_p: _add, lax.sub_p: _sub, lax.mul_p: _mul, lax.div_p: _div,
                      lax.dot_general_p: _dot_general, lax.gather_p: _gather})


# Inverse rules that rebuild an input exactly, up to the rounding of one addition or a
# move: a loop made of these (additive couplings, permutations, reshapes) does not
# amplify rounding from step to step, so reversible backprop through it is stable.
VOLUME_PRESERVING = {lax.add_p, lax.sub_p, lax.neg_p, lax.copy_p, lax.reshape_p,
                     lax.squeeze_p, lax.broadcast_in_dim_p, lax.transpose_p, lax.rev_p,
                     lax.gather_p, lax.convert_element_type_p}


@dataclasses.dataclass(frozen=True)
class Move:
    """One step of an inversion: ``kind`` is ``"eval"`` (all inputs known: evaluate),
    ``"split"``, ``"concat"``, ``"slices"`` (moves of a partition), ``"rule"`` (rebuild
    input ``pos`` with ``inverse_rules``) or ``"region"`` (Newton steps through the
    elementwise ``region`` with unknown ``root``)."""

    kind: str
    node: G.Node
    pos: int = -1
    region: tuple = ()
    root: G.Value | None = None

    def describe(self) -> str:
        """What the move does to rounding, and where (for messages)."""
        nodes = self.region or (self.node,)
        name = "/".join(dict.fromkeys(n.primitive.name for n in nodes))
        how = {"region": "takes Newton steps through", "rule": "inverts"}.get(self.kind, "moves")
        if self.kind == "rule" and self.node.primitive is lax.dot_general_p:
            how = "solves with the weight of"
        elif self.kind == "rule" and not self.preserving:
            how = "divides to invert"
        return f"{how} `{name}` at {where(nodes[0].source_info)}"

    @property
    def preserving(self) -> bool:
        """Whether this move rebuilds its input without amplifying rounding."""
        if self.kind == "rule":
            return self.node.primitive in VOLUME_PRESERVING
        return self.kind != "region"


@dataclasses.dataclass(frozen=True)
class Inversion:
    """How to rebuild ``targets`` of a layer from what is known: the ``moves`` in
    order, or the ``stuck`` node where no rule applies."""

    moves: tuple
    stuck: G.Node | None

    @property
    def amplifier(self) -> Move | None:
        """The first move that can amplify rounding (a division, a solve, Newton)."""
        return next((m for m in self.moves if not m.preserving), None)

    @property
    def divides_only(self) -> bool:
        """Whether every move that can amplify rounding is an elementwise division by
        a known value (an affine coupling's scale): no solve, no Newton steps."""
        return all(m.preserving or (m.kind == "rule" and m.node.primitive in (
            lax.mul_p, lax.div_p)) for m in self.moves)


def plan_inversion(graph: G.Graph, known, targets: list) -> Inversion:
    """The moves that rebuild ``targets`` given the values whose ids are in ``known``:
    a static analysis (shapes and structure only, nothing runs)."""
    have_ids = set(known)
    done: set[int] = set()
    moves: list = []
    have = lambda a: isinstance(a, G.Lit) or id(a) in have_ids
    progress = True
    while progress and not all(id(t) in have_ids for t in targets):
        progress = False
        for node in graph.nodes:
            if id(node) in done:
                continue
            if all(have(a) for a in node.inputs):
                move = Move("eval", node)
            else:
                move = _inverse_move(node, have, have_ids)
            if move is None:
                continue
            moves.append(move)
            done.update(map(id, move.region or (node,)))
            progress = True
            if move.kind == "eval":
                have_ids.update(map(id, node.outputs))
            elif move.kind == "region":
                have_ids.add(id(move.root))
            elif move.kind == "rule":
                have_ids.add(id(node.inputs[move.pos]))
            else:
                have_ids.update(id(a) for a in _rebuilt(move))
    stuck = None
    if not all(id(t) in have_ids for t in targets):
        left = [n for n in graph.nodes if id(n) not in done]
        stuck = left[-1] if left else graph.nodes[-1]
    return Inversion(tuple(moves), stuck)


def _rebuilt(move: Move) -> list:
    """The inputs a move of a partition rebuilds."""
    node = move.node
    if move.kind == "slices":
        return [node.inputs[0]]
    return [a for a in node.inputs if isinstance(a, G.Value)]


def _inverse_move(node, have, have_ids) -> Move | None:
    prim = node.primitive
    if not all(id(o) in have_ids or not _is_float(o) for o in node.outputs):
        return None
    unknown = [p for p, a in enumerate(node.inputs) if not have(a)]
    if prim is lax.split_p:
        return Move("split", node)
    if prim is lax.concatenate_p:
        return Move("concat", node)
    if prim is lax.slice_p:
        x = node.inputs[0]
        group = [n for n, _ in x.uses if n.primitive is lax.slice_p]
        if all(id(n.outputs[0]) in have_ids for n in group) and _slice_partition(group, x):
            return Move("slices", node)
        return None
    if len(node.outputs) != 1 or id(node.outputs[0]) not in have_ids:
        return None
    if len(unknown) == 1 and prim in inverse_rules:
        return Move("rule", node, pos=unknown[0])
    if prim in elementwise_rules:
        return _region_move(node, have)
    return None


def _slice_partition(group, x):
    from moonjax._src.rules.structural import slice_partition

    return slice_partition(group, x.aval)


def _region_move(node, have) -> Move | None:
    """An elementwise region ``y = φ(v)`` around ``node`` with one unknown root ``v``."""
    region = {id(node): node}
    while True:
        inner = {id(o) for n in region.values() for o in n.outputs}
        unknown = {id(a): a for n in region.values() for a in n.inputs
                   if not have(a) and id(a) not in inner}
        if len(unknown) == 1:
            break
        expand = [a.producer for a in unknown.values()
                  if a.producer is not None and a.producer.primitive in elementwise_rules
                  and all(id(u) in region for u, _ in a.uses)]
        if not expand:
            return None
        region.update((id(n), n) for n in expand)
    (v,) = unknown.values()
    if not _is_float(v) or v.aval.shape != node.outputs[0].aval.shape:
        return None
    order = tuple(sorted(region.values(), key=lambda n: n.index))
    if derivative_sign(order, v, node.outputs[0], None) is None:
        return None  # not provably strictly monotone (ReLU forgets): no inverse
    return Move("region", node, region=order, root=v)


def invert(graph: G.Graph, known: dict, targets: list, inversion: Inversion | None = None
           ) -> list:
    """Values of ``targets`` given ``known`` (``id(Value) -> value``) in ``graph``,
    by the moves of ``inversion`` (planned here if not given)."""
    if inversion is None:
        inversion = plan_inversion(graph, known, targets)
    if inversion.stuck is not None:
        raise equation_error(
            NotSubmersiveError, inversion.stuck,
            "reversible mode cannot rebuild this layer's input from its output: "
            f"`{inversion.stuck.primitive.name}` is not invertible here (not submersive, "
            "or no inverse rule)",
            "leave fragments=True (the default: such a loop is checkpointed, reverse mode "
            "over blocks of its steps, exact), or build the layer from invertible "
            "moonjax.nn modules")
    val = dict(known)
    read = lambda a: a.val if isinstance(a, G.Lit) else val[id(a)]
    for move in inversion.moves:
        node = move.node
        if move.kind == "eval":
            for o, x in zip(node.outputs, node.bind(*[read(a) for a in node.inputs])):
                val.setdefault(id(o), x)
        elif move.kind == "split":
            val[id(node.inputs[0])] = lax.concatenate([val[id(o)] for o in node.outputs],
                                                      node.params["axis"])
        elif move.kind == "concat":
            y, start, dim = val[id(node.outputs[0])], 0, node.params["dimension"]
            for a in node.inputs:
                size = a.aval.shape[dim]
                if isinstance(a, G.Value) and id(a) not in val:
                    val[id(a)] = lax.slice_in_dim(y, start, start + size, axis=dim)
                start += size
        elif move.kind == "slices":
            x = node.inputs[0]
            group = [n for n, _ in x.uses if n.primitive is lax.slice_p]
            axis, pieces = _slice_partition(group, x)
            val[id(x)] = lax.concatenate([val[id(n.outputs[0])] for _, _, n in pieces], axis)
        elif move.kind == "rule":
            invals = [None if p == move.pos else read(a) for p, a in enumerate(node.inputs)]
            val[id(node.inputs[move.pos])] = inverse_rules[node.primitive](
                node, move.pos, val[id(node.outputs[0])], invals)
        else:
            val[id(move.root)] = _newton(move, val[id(node.outputs[0])], read)
    return [val[id(t)] for t in targets]


def _is_float(v) -> bool:
    return jnp.issubdtype(v.aval.dtype, jnp.inexact)


def _newton(move: Move, y, read):
    """Newton steps for ``y = φ(v)`` started at ``y``: exact for sign-preserving
    piecewise-linear maps (leaky-ReLU)."""
    v, out = move.root, move.node.outputs[0]

    def phi(a):
        env = {id(v): a}
        get = lambda x: env[id(x)] if id(x) in env else read(x)
        for n in move.region:
            env.update(zip(map(id, n.outputs), n.bind(*[get(x) for x in n.inputs])))
        return env[id(out)]

    a = y
    for _ in range(NEWTON_STEPS):
        f, df = jax.jvp(phi, (a,), (jnp.ones_like(a),))
        a = a - (f - y) / df
    return a
