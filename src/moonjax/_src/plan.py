"""The plan: which treatment each loop over layers gets, decided from the program alone.

``analyse(graph, stream_pos)`` reads the flattened loss (shapes and structure, nothing
runs) and returns a :class:`Plan` that the gradient (``mode="auto"``, the default) and
``moonjax.check`` both read:

* ``reversible`` — reversible backprop: a ``lax.scan`` whose body rebuilds its input
  from its output by additions and moves alone (additive couplings, permutations,
  reshapes) does not amplify rounding from layer to layer, so walking it backwards,
  inverting each step and taking its vjp, is exact, stable and the cheapest schedule:
  one carry kept per loop, no sweep afterwards. Where the inverse also divides
  elementwise by known values (an affine coupling's scale), the carry is stored every
  :data:`~moonjax._src.phase1.REVERSIBLE_ANCHOR` steps and the inversion restarts there.
* ``checkpointed`` — a loop whose inverse solves with a weight, takes Newton steps, does
  not exist, or that reads the network input outside its carry: reverse mode over blocks
  of about ``sqrt(length)`` steps, the carry stored at each block's start, and going
  back each block run forwards once more for its step inputs, then each step's vjp.
  Exact for any body; each step runs forwards twice more. The sweep would anchor such a loop
  every few steps anyway (its cotangent is rebuilt through the same solves and
  divisions), keeping a cotangent per anchor and solving per step: checkpointing runs at
  about half its time, and for long loops keeps less. Both are estimated from the
  residuals of one step's vjp (shapes only), and the loop is checkpointed unless that
  keeps more than :data:`CHECKPOINT_MARGIN` times what the sweep would.
* ``moonwalk`` — mixed phase 1, then the inverse-forward sweep (anchored where the
  sweep divides or solves, with fragments where it cannot cross): for the loops above
  where it keeps clearly less (short loops), for programs without loops, and where
  reverse mode outside the loops would keep many activations.

Reverse mode through a program's parts outside its loops keeps their activations, so
the loops are run as above only where the layers before the last loop are few (an
embedding); the loss head after the loops is reverse mode under every treatment. In a
program that is swept, the reversible loops still save their memory: mixed phase 1 runs
them by inversion (one carry kept) and the sweep crosses them.
"""

from __future__ import annotations

import dataclasses

import jax
from jax import lax

from moonjax._src import graph as G
from moonjax._src.errors import where
from moonjax._src.phase1 import (
    AUTO_ANCHOR,
    LoopBody,
    checkpoint_interval,
    interval,
    reversible_anchor,
    reversible_loops,
    step_function,
)
from moonjax._src.sweep import stream_dependence
from moonjax._src.unrolled import runs as unrolled_runs

REVERSIBLE = "reversible"
CHECKPOINTED = "checkpointed"
MOONWALK = "moonwalk"
REVERSE = "reverse"
# what the gradient runs for each treatment of the whole program (``mode=`` names)
RUNS = {REVERSIBLE: "reversible", CHECKPOINTED: "checkpointed", MOONWALK: "mixed",
        REVERSE: "reverse"}

# checkpointed reverse mode for a loop unless it would keep more than this many times
# what the sweep keeps (estimated): it is the faster of the two, by about 2x
CHECKPOINT_MARGIN = 1.1

# reverse mode for the whole program only while the stream-dependent values
# outside the loops and before the last one (what reverse mode keeps there and the
# sweep would not) are at most this many times the loops' carries
OUTSIDE_LIMIT = 4


@dataclasses.dataclass(frozen=True)
class LoopPlan:
    """One ``lax.scan`` over the stream: what it could get and why."""

    node: G.Node
    treatment: str  # REVERSIBLE, CHECKPOINTED or MOONWALK
    reason: str  # the rule or primitive that decided it, with its source line
    body: LoopBody | None = None
    anchor_every: int | None = None  # the carry stored every k steps (None: never)

    @property
    def where(self) -> str:
        return where(self.node.source_info)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The program's treatment, and each loop's."""

    treatment: str
    reason: str
    loops: tuple = ()
    runs: tuple = ()  # unrolled runs of invertible segments (unrolled.Run)


def analyse(graph: G.Graph, stream_pos) -> Plan:
    """The plan for ``graph`` whose invars at ``stream_pos`` are the network input."""
    dep = stream_dependence(graph, [i in stream_pos for i in range(len(graph.invars))])
    invertible = {id(node): body for node, body in reversible_loops(graph, dep)}
    loops = []
    for node in graph.nodes:
        if node.primitive is not lax.scan_p or not any(
                isinstance(a, G.Value) and id(a) in dep for a in node.inputs):
            continue
        loops.append(_loop_plan(node, invertible.get(id(node))))
    runs = tuple(unrolled_runs(graph, dep, "auto"))
    if not loops:
        if runs:
            return Plan(REVERSIBLE, "; ".join(r.describe() for r in runs), (), runs)
        return Plan(REVERSE, "no lax.scan over layers and no run of unrolled layers that "
                    "inverts: reverse mode keeps least")
    # after the last loop comes the loss head: reverse mode under every treatment
    last = max(lp.node.index for lp in loops)
    carried = sum(_bytes(a) for lp in loops for a in _carries(lp.node))
    in_runs = {id(n) for r in runs for n in r.nodes}
    outside = sum(_bytes(o) for node in graph.nodes[:last] if node.primitive is not lax.scan_p
                  and id(node) not in in_runs
                  and any(isinstance(a, G.Value) and id(a) in dep for a in node.inputs)
                  for o in node.outputs)
    if outside > OUTSIDE_LIMIT * carried:
        return Plan(MOONWALK, f"reverse mode outside the loops would keep {outside} bytes "
                    f"of activations ({outside / carried:.1f}x the loops' carries)",
                    tuple(loops))
    swept = [lp for lp in loops if lp.treatment == MOONWALK]
    if swept:
        return Plan(MOONWALK, f"the loop at {swept[0].where}: {swept[0].reason}",
                    tuple(loops))
    held = [lp for lp in loops if lp.treatment == CHECKPOINTED]
    if held:
        return Plan(CHECKPOINTED, f"the loop at {held[0].where}: {held[0].reason}",
                    tuple(loops), runs)
    how = ("additions and moves" if all(lp.anchor_every is None for lp in loops)
           else "additions, moves and elementwise divisions")
    return Plan(REVERSIBLE, f"every loop over layers inverts by {how}", tuple(loops), runs)


def _loop_plan(node, body: LoopBody | None) -> LoopPlan:
    def checkpointed(reason):
        """Checkpointed reverse mode, unless the sweep keeps clearly less."""
        length = node.params["length"]
        k = checkpoint_interval(length)
        stuck = body is None or body.inversion.stuck is not None
        kept, swept = _memory(node, k, stuck)
        if kept > CHECKPOINT_MARGIN * swept:
            return LoopPlan(node, MOONWALK, f"{reason}, and checkpointing it would keep "
                            f"about {kept} bytes against the sweep's {swept}", body)
        return LoopPlan(node, CHECKPOINTED, reason, body, k)

    if body is None:
        return checkpointed("reads the network input outside its carry")
    inversion = body.inversion
    if inversion.stuck is not None:
        return checkpointed(f"no inverse rule for `{inversion.stuck.primitive.name}` at "
                            f"{where(inversion.stuck.source_info)}")
    if inversion.amplifier is None:
        return LoopPlan(node, REVERSIBLE, "its inverse adds and moves only", body)
    if inversion.divides_only:
        k = reversible_anchor(body, "auto", node.params["length"])
        return LoopPlan(node, REVERSIBLE, f"its inverse {inversion.amplifier.describe()}"
                        + (f": anchored every {k} steps" if k else ""), body, k)
    return checkpointed(f"its inverse {inversion.amplifier.describe()}")


def _memory(node, k: int, stuck: bool) -> tuple[int, int]:
    """Estimated bytes a loop keeps: ``(checkpointed in blocks of k, swept)``, from the
    residuals JAX's vjp of one step keeps (shapes only, under ``jax.eval_shape``).
    Checkpointed: a carry per block, one block's step inputs and one step's residuals of
    the vjp for every input; swept: a carry cotangent every ``AUTO_ANCHOR`` steps (its
    anchors) and every step's residuals of the vjp for the carry alone (mixed phase 1:
    parameters held constant, sign masks packed to bits), and with ``stuck`` (no
    inverse) a fragment of about a carry per step."""
    p = node.params
    nc, ncar, length = p["num_consts"], p["num_carry"], p["length"]
    body, body_consts = G.flatten(p["jaxpr"])
    avals = [a.aval for a in node.inputs]
    sds = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    shapes = ([sds(a) for a in avals[:nc]], [sds(a) for a in avals[nc:nc + ncar]],
              [jax.ShapeDtypeStruct(a.shape[1:], a.dtype) for a in avals[nc + ncar:]])

    step = step_function(body, body_consts, ncar)

    def residuals(carry_only: bool):
        def f(consts, carry, xs):
            if carry_only:
                _, pullback = jax.vjp(lambda c: step(consts, c, xs), carry)
            else:
                _, pullback = jax.vjp(step, consts, carry, xs)
            held = {id(t) for t in jax.tree_util.tree_leaves((consts, xs))}  # not copied
            return [r for r in jax.tree_util.tree_leaves(pullback) if id(r) not in held]

        out = jax.eval_shape(f, *shapes)
        bits = 1 if carry_only else 8  # a bool: packed by mixed phase 1, a byte otherwise
        return sum(r.size * (bits / 8 if r.dtype == bool else r.dtype.itemsize) for r in out)

    carry = sum(_bytes(a) for a in _carries(node))
    checkpointed = (-(-length // k) + k) * carry + residuals(False)
    # a body with no inverse is one the sweep cannot cross either: a fragment per step
    fragment = carry if stuck else 0
    anchor = interval(AUTO_ANCHOR, length)  # as phase 1 anchors it: a divisor
    anchors = length // anchor if anchor else 0
    swept = length * (residuals(True) + fragment) + anchors * carry
    return int(checkpointed), int(swept)


def _carries(node) -> list:
    nc, ncar = node.params["num_consts"], node.params["num_carry"]
    return node.inputs[nc:nc + ncar]


def _bytes(v) -> int:
    aval = v.aval
    return int(getattr(aval, "size", 0)) * getattr(getattr(aval, "dtype", None),
                                                   "itemsize", 0)
