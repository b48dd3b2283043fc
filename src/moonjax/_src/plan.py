"""The plan: which treatment each loop over layers gets, decided from the program alone.

``analyse(graph, stream_pos)`` reads the flattened loss (shapes and structure, nothing
runs) and returns a ``Plan`` that the gradient (``mode="auto"``, the default) and
``moonjax.check`` both read:

* ``reversible`` — reversible backprop: a ``lax.scan`` whose body rebuilds its input
  from its output by additions, moves and elementwise divisions by known values
  (additive and affine couplings, permutations, reshapes): walking it backwards,
  inverting each step and taking its vjp, is exact and the cheapest schedule, no sweep
  afterwards. The carry is stored every ``REVERSIBLE_ANCHOR``
  steps and the inversion restarts there (additions lose bits too where a side branch
  dwarfs what it is added to). Runs of unrolled layers that invert so
  (``moonjax._src.unrolled.runs``) get the same treatment.
* ``checkpointed`` — a loop whose inverse solves with a weight, takes Newton steps, does
  not exist, or that reads the network input outside its carry: reverse mode over blocks
  of about ``sqrt(length)`` steps, the carry stored at each block's start, and going
  back each block run forwards once more for its step inputs, then each step's vjp.
  Exact for any body and any weights; each step runs forwards twice more. The sweep
  would solve through the same weights, and at a framework's default initialisation a
  dense layer's solve loses two to three float32 digits: the default does not sweep
  such loops.
* ``reverse`` — plain reverse mode (``jax.grad``'s): a program with no loop over layers
  and no run of unrolled layers that inverts and would keep less.
* ``moonwalk`` — mixed phase 1, then the inverse-forward sweep (anchored where the
  sweep divides or solves, with fragments where it cannot cross): where reverse mode
  outside the loops would keep many activations.

Reverse mode through a program's parts outside its loops and runs keeps their
activations, so the loops are run as above only where those are few (an embedding);
the loss head after the loops is reverse mode under every treatment. In a program that
is swept, the reversible loops still save their memory: mixed phase 1 runs them by
inversion (one carry kept) and the sweep crosses them.
"""

from __future__ import annotations

import dataclasses

from jax import lax

from moonjax._src import graph as G
from moonjax._src.checkpointed import checkpoint_interval
from moonjax._src.errors import where
from moonjax._src.reversible import LoopBody, reversible_anchor, reversible_loops
from moonjax._src.sweep import stream_dependence
from moonjax._src.unrolled import runs as unrolled_runs
from moonjax._src.unrolled import value_bytes as _bytes

REVERSIBLE = "reversible"
CHECKPOINTED = "checkpointed"
MOONWALK = "moonwalk"
REVERSE = "reverse"
# what the gradient runs for each treatment of the whole program (``mode=`` names)
RUNS = {REVERSIBLE: "reversible", CHECKPOINTED: "checkpointed", MOONWALK: "mixed",
        REVERSE: "reverse"}

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
        """Checkpointed reverse mode: exact whatever the weights' conditioning (the
        sweep through solves or Newton steps can lose every digit at a default init)."""
        return LoopPlan(node, CHECKPOINTED, reason, body,
                        checkpoint_interval(node.params["length"]))

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


def _carries(node) -> list:
    nc, ncar = node.params["num_consts"], node.params["num_carry"]
    return node.inputs[nc:nc + ncar]
