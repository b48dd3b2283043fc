"""A flat data-flow graph of a jaxpr, the form every moonjax pass works on.

``flatten`` turns a closed jaxpr into a ``Graph`` of ``Node`` s, inlining
call-like primitives (nested ``jit``, ``custom_jvp_call``, ``custom_vjp_call``,
``remat``, ``closed_call``) so that the spine/side analysis sees one graph. Each node
keeps the ``source_info`` of the user's equation. ``scan`` stays one node: its body
is flattened again when the sweep reaches it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jax.extend import core as jex_core

from moonjax._src.errors import user_line

# Call-like primitives and the parameter that holds their body.
_INLINE_BODY = {
    "jit": "jaxpr",
    "pjit": "jaxpr",
    "closed_call": "call_jaxpr",
    "core_call": "call_jaxpr",
    "custom_jvp_call": "call_jaxpr",
    "custom_vjp_call": "call_jaxpr",
    "custom_vjp_call_jaxpr": "fun_jaxpr",
    "remat2": "jaxpr",
    "checkpoint": "jaxpr",
}

# Names given (through ``jax.jit``) to blocks that carry a hand-written vijp; the
# flattener keeps such a call as one node instead of inlining it.
CUSTOM_BLOCKS: dict[str, Any] = {}


class Value:
    """One value of the graph (a jaxpr variable after inlining)."""

    __slots__ = ("aval", "producer", "uses", "name")

    def __init__(self, aval, name: str = ""):
        self.aval = aval
        self.producer: Node | None = None
        self.uses: list[tuple[Node, int]] = []
        self.name = name

    def __repr__(self) -> str:
        return f"Value({self.name}:{self.aval.str_short()})"


@dataclasses.dataclass(frozen=True)
class Lit:
    """A literal operand."""

    val: Any
    aval: Any


@dataclasses.dataclass(eq=False)
class Node:
    """One primitive application of the flattened program."""

    primitive: Any
    params: dict
    inputs: list  # Value | Lit
    outputs: list  # Value
    source_info: Any
    index: int = -1

    def bind(self, *args):
        out = self.primitive.bind(*args, **self.params)
        return list(out) if self.primitive.multiple_results else [out]

    def __repr__(self) -> str:
        return f"Node#{self.index}({self.primitive.name})"


@dataclasses.dataclass(eq=False)
class Graph:
    invars: list  # Value
    outvars: list  # Value | Lit
    nodes: list  # Node, in a topological order

    def is_output(self, v: Value) -> bool:
        return any(o is v for o in self.outvars)


def run_nodes(nodes, env: dict, bind=None) -> dict:
    """Evaluate ``nodes`` in order, reading and writing ``env`` (a value's ``id`` ->
    its array); ``bind(node, args)`` may replace a node's evaluation (``None``: bind
    the primitive)."""
    read = lambda a: a.val if isinstance(a, Lit) else env[id(a)]
    for node in nodes:
        args = [read(a) for a in node.inputs]
        outs = bind(node, args) if bind is not None else None
        env.update(zip(map(id, node.outputs), node.bind(*args) if outs is None else outs))
    return env


def evaluate(graph: Graph, invals, bind=None) -> list:
    """The values of ``graph``'s outputs for its inputs ``invals`` (``bind``: as in
    ``run_nodes``)."""
    env = run_nodes(graph.nodes, {id(v): x for v, x in zip(graph.invars, invals)}, bind)
    return [o.val if isinstance(o, Lit) else env[id(o)] for o in graph.outvars]


def _body(eqn_prim_name: str, params: dict):
    key = _INLINE_BODY.get(eqn_prim_name)
    if key is None or key not in params:
        return None
    if eqn_prim_name in ("jit", "pjit") and params.get("name") in CUSTOM_BLOCKS:
        return None
    body = params[key]
    if isinstance(body, jex_core.ClosedJaxpr):
        return body.jaxpr, list(body.consts)
    return body, []


def flatten(closed_jaxpr: jex_core.ClosedJaxpr) -> tuple[Graph, list]:
    """Flatten ``closed_jaxpr``: returns the graph and the values of its constants.

    The graph's ``invars`` are the constants (the jaxpr's own and those of inlined
    bodies, ``len(consts)`` of them) followed by the jaxpr's invars.
    """
    jaxpr = closed_jaxpr.jaxpr
    nodes: list[Node] = []
    counter = [0]

    def fresh(aval) -> Value:
        counter[0] += 1
        return Value(aval, f"v{counter[0]}")

    def atom(env, a):
        if isinstance(a, jex_core.Literal):
            return Lit(a.val, a.aval)
        return env[a]

    const_values: list = []

    def walk(jx, env, call_site=None):
        for eqn in jx.eqns:
            source_info = eqn.source_info
            if call_site is not None and not _user_location(source_info):
                # a body traced inside JAX (jax.nn, jnp.where): point at the user's call
                source_info = call_site
            ins = [atom(env, a) for a in eqn.invars]
            body = _body(eqn.primitive.name, eqn.params)
            if body is not None:
                inner, consts = body
                inner_env = {}
                for cv, c in zip(inner.constvars, consts):
                    val = fresh(cv.aval)
                    const_values.append((val, c))
                    inner_env[cv] = val
                for iv, a in zip(inner.invars, ins):
                    inner_env[iv] = a
                walk(inner, inner_env, source_info)
                for ov, inner_ov in zip(eqn.outvars, inner.outvars):
                    env[ov] = atom(inner_env, inner_ov)
                continue
            outs = [fresh(o.aval) for o in eqn.outvars]
            node = Node(eqn.primitive, dict(eqn.params), ins, outs, source_info, len(nodes))
            for o, v in zip(outs, eqn.outvars):
                o.producer = node
                if not isinstance(v, jex_core.DropVar):
                    env[v] = o
            for pos, a in enumerate(ins):
                if isinstance(a, Value):
                    a.uses.append((node, pos))
            nodes.append(node)

    env: dict = {}
    top_consts = [fresh(v.aval) for v in jaxpr.constvars]
    top_invars = [fresh(v.aval) for v in jaxpr.invars]
    env.update(zip(jaxpr.constvars, top_consts))
    env.update(zip(jaxpr.invars, top_invars))
    walk(jaxpr, env)
    outvars = [atom(env, a) for a in jaxpr.outvars]
    # Constants of inlined bodies become extra constant inputs of the graph.
    consts = top_consts + [v for v, _ in const_values]
    graph = dce(Graph(consts + top_invars, outvars, nodes))
    return graph, list(closed_jaxpr.consts) + [c for _, c in const_values]


def _user_location(source_info) -> bool:
    return user_line(source_info) is not None


def dce(graph: Graph) -> Graph:
    """Drop nodes whose outputs reach no output (pure programs only)."""
    live: set[int] = set()
    needed = {id(v) for v in graph.outvars if isinstance(v, Value)}
    kept = []
    for node in reversed(graph.nodes):
        if node.primitive.name in _EFFECTFUL or any(id(o) in needed for o in node.outputs):
            kept.append(node)
            live.add(id(node))
            needed.update(id(a) for a in node.inputs if isinstance(a, Value))
    kept.reverse()
    values = list(graph.invars) + [o for node in kept for o in node.outputs]
    for v in values:
        v.uses = [(n, p) for n, p in v.uses if id(n) in live]
    for i, node in enumerate(kept):
        node.index = i
    return Graph(graph.invars, graph.outvars, kept)


_EFFECTFUL = {"debug_callback", "io_callback"}
