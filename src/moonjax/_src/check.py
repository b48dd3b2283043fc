"""``moonjax.check``: what the sweep would do with a model, without running it.

``check(loss, *args)`` traces ``moonjax.moonwalk_grad(loss)(*args)`` (tracing only:
no array is computed, nothing is compiled) and reports

* whether Moonwalk can differentiate the model (``ok``), and if not the first
  ``MoonjaxError`` with the primitive, the user's ``file:line`` and a fix;
* the sweep's decisions grouped per layer (one group per source line, one per ``scan``
  body): which groups are on the *spine* (inverted by a vijp rule or as an
  elementwise region), which are *side* branches (reverse mode inside the layer) and
  which are the loss *head* (reverse mode at the end);
* the rule that crossed each spine primitive (``linear``, ``structural``,
  ``elementwise``, ``custom_vijp``, …);
* the fragments phase 1 would store for the layers that are not submersive, in bytes.

The public trace (``jax.make_jaxpr`` of the real transform) decides ``ok``; a second,
analysis-only trace runs the sweep on the flattened loss with
``moonjax._src.sweep.REPORT`` set, to collect the ``Step`` s.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moonjax._src import graph as G
from moonjax._src import plan as P
from moonjax._src import sweep as S
from moonjax._src.errors import (
    ArgumentError,
    LossShapeError,
    MoonjaxError,
    NonFiniteCotangentError,
    NotSubmersiveError,
    SpineStructureError,
    UnsupportedPrimitiveError,
    where,
)
from moonjax._src.loops import AUTO_ANCHOR
from moonjax._src.reversible import fallback_interval, reversible_anchor
from moonjax._src.rules import vijp_rules

__all__ = ["CheckReport", "LayerGroup", "StepInfo", "check"]

_SPINE_KINDS = ("spine", "region", "fragment")

_SUGGESTIONS: dict[type, str] = {
    UnsupportedPrimitiveError: (
        "give the primitive a vijp rule (moonjax.register_vijp, a fragment rule), wrap the "
        "block in moonjax.custom_vijp, rebuild the layer from moonjax.nn modules, or keep "
        "mode='mixed' with fragments=True so phase 1 stores its output cotangent"),
    NotSubmersiveError: (
        "use an invertible or dimension-lowering layer from moonjax.nn (InvertibleDense, "
        "LeakyReLU, a coupling), write its vijp with moonjax.custom_vijp, or keep "
        "mode='mixed' with fragments=True so phase 1 stores the erased cotangent "
        "(a fragment)"),
    SpineStructureError: (
        "make every spine value feed one layer: write residual blocks as couplings "
        "(moonjax.nn.AdditiveCoupling, RevBlock), or wrap the block in moonjax.custom_vijp"),
    LossShapeError: "return a real float scalar (reduce with jnp.mean / jnp.sum)",
    ArgumentError: "fix argnums / stream_argnums or the argument types",
    NonFiniteCotangentError: "check the weights for singular matrices",
}


# -- the report ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """One decision of the sweep.

    Attributes:
      kind: ``"spine"`` (a vijp rule), ``"region"`` (an elementwise region, ``g / φ'``),
        ``"side"`` (reverse mode inside the layer), ``"head"`` (reverse mode at the
        end), ``"fragment"`` (an output cotangent stored by phase 1) or ``"scan"``.
      primitives: the primitives of the step, in program order.
      rule: the rule family that handled it (``linear``, ``structural``,
        ``elementwise``, ``custom_vijp``, ``register_vijp``, ``reverse mode``, …).
      location: the user's ``file:line:column (function)``.
      fragment_bytes: bytes phase 1 stores for this step (per execution).
    """

    kind: str
    primitives: tuple[str, ...]
    rule: str
    location: str
    fragment_bytes: int = 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"primitives": list(self.primitives)}


@dataclasses.dataclass(frozen=True)
class LayerGroup:
    """Consecutive sweep steps from one source line, or one ``scan`` over layers.

    Attributes:
      location: ``file:line (function)`` of the group.
      role: ``"spine"`` (the group crosses the spine), ``"side"`` (only side branches),
        ``"head"`` (only the loss head) or ``"scan"`` (a loop; see ``groups``).
      submersive: ``False`` when phase 1 must store a fragment for the group.
      steps: the steps of the group (empty for a scan).
      fragment_bytes: bytes stored for the group over the whole run (a scan counts
        its body once per iteration).
      length: the number of iterations of a scan (1 otherwise).
      groups: the groups of a scan's body (per iteration).
      stability: how the sweep keeps the group's rounding in check:
        ``"volume-preserving"`` (shifts and moves: rounding does not grow),
        ``"anchored every k"`` or ``"anchored (auto, ...)"`` (a loop that solves with
        weights or divides by derivatives, restarted from an exact cotangent every few
        steps),
        ``"drift-checked"`` (it may amplify rounding; the call's drift check raises
        ``moonjax.DriftError`` if it did), ``"exact"`` (reverse mode, or a fragment
        phase 1 recorded).
      treatment: for a loop, what the plan gives it and why: ``"reversible backprop
        (...)"`` (one carry kept, nothing per step) or ``"moonwalk (...)"``.
    """

    location: str
    role: str
    submersive: bool
    steps: tuple[StepInfo, ...] = ()
    fragment_bytes: int = 0
    length: int = 1
    groups: tuple[LayerGroup, ...] = ()
    stability: str = ""
    treatment: str = ""

    def walk(self):
        """This group and all groups nested in it, depth first."""
        yield self
        for g in self.groups:
            yield from g.walk()

    def primitives(self, kind: str | None = None) -> list[str]:
        """The primitives of the group's own steps (of one ``kind`` if given)."""
        return [p for s in self.steps if kind in (None, s.kind) for p in s.primitives]

    def to_dict(self) -> dict:
        return {
            "location": self.location,
            "role": self.role,
            "submersive": self.submersive,
            "fragment_bytes": self.fragment_bytes,
            "length": self.length,
            "stability": self.stability,
            "treatment": self.treatment,
            "steps": [s.to_dict() for s in self.steps],
            "groups": [g.to_dict() for g in self.groups],
        }


@dataclasses.dataclass(frozen=True)
class CheckReport:
    """What ``check`` found. ``str(report)`` is a readable table.

    Attributes:
      ok: ``moonwalk_grad`` with these options can differentiate the model.
      error: the ``MoonjaxError`` it would raise, else ``None``.
      primitive, location: the primitive and the user's ``file:line`` of ``error`` (or,
        when the model is ok but not submersive, of the first layer that needs a
        fragment); ``None`` if not known.
      suggestion: what to do about ``error`` (or about the fragments).
      submersive: every layer is submersive: phase 1 stores no fragment.
      fragment_error: when fragments are needed, the error ``fragments=False`` would
        raise at the first non-submersive layer (it says why the layer is not submersive).
      fragment_bytes: total bytes of fragments phase 1 stores per gradient.
      groups: the layer groups, in sweep order.
      rules: spine primitive name -> the rule families that crossed it.
      mode, fragments: the options checked.
      treatment: what the gradient runs: ``"reversible"`` (reversible backprop),
        ``"checkpointed"`` (reverse mode: loops inverted, or checkpointed where they
        do not invert by additions, moves or divisions), ``"mixed"`` (Moonwalk) or
        ``"forward"``; with ``mode="auto"`` the plan's choice, and ``plan`` says why.
      notes: anything else worth knowing.
    """

    ok: bool
    error: MoonjaxError | None
    mode: str
    fragments: bool
    groups: tuple[LayerGroup, ...]
    rules: dict[str, tuple[str, ...]]
    submersive: bool
    fragment_bytes: int
    fragment_error: MoonjaxError | None = None
    primitive: str | None = None
    location: str | None = None
    suggestion: str | None = None
    notes: tuple[str, ...] = ()
    treatment: str = ""
    plan: str = ""

    def __repr__(self) -> str:
        err = None if self.error is None else type(self.error).__name__
        return (f"CheckReport(ok={self.ok}, error={err}, submersive={self.submersive}, "
                f"fragment_bytes={self.fragment_bytes}, groups={len(self.groups)})")

    def all_groups(self):
        """Every group, scan bodies included, depth first."""
        for g in self.groups:
            yield from g.walk()

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (``json.dumps(report.to_dict())``)."""
        return {
            "ok": self.ok,
            "error": None if self.error is None else {
                "type": type(self.error).__name__, "message": str(self.error)},
            "primitive": self.primitive,
            "location": self.location,
            "suggestion": self.suggestion,
            "mode": self.mode,
            "treatment": self.treatment,
            "plan": self.plan,
            "fragments": self.fragments,
            "submersive": self.submersive,
            "fragment_bytes": self.fragment_bytes,
            "fragment_error": None if self.fragment_error is None else {
                "type": type(self.fragment_error).__name__,
                "message": str(self.fragment_error)},
            "rules": {k: list(v) for k, v in self.rules.items()},
            "groups": [g.to_dict() for g in self.groups],
            "notes": list(self.notes),
        }

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    # -- text -----------------------------------------------------------------------

    def _headline(self) -> str:
        opts = f"mode={self.mode!r}, fragments={self.fragments}"
        if self.treatment and self.treatment != self.mode:
            opts += f" -> {_TREATMENTS[self.treatment]}"
        if not self.ok:
            return f"moonjax check: FAILED ({opts}): {type(self.error).__name__}"
        if self.treatment == "reverse":
            return f"moonjax check: OK ({opts}): no sweep, nothing recorded"
        if self.submersive:
            return f"moonjax check: OK ({opts}): every layer is submersive, no fragments"
        return (f"moonjax check: OK ({opts}): not submersive, phase 1 stores "
                f"{_bytes(self.fragment_bytes)} of fragments per gradient")

    def _rows(self):
        """``(index, location, role, submersive, fragments, steps)`` per group."""
        def rows(groups, prefix):
            for i, g in enumerate(groups, 1):
                idx = f"{prefix}{i}"
                if g.role == "scan":
                    steps = f"scan x{g.length}: {g.treatment or 'sweeps its body with a scan'}"
                elif g.role in ("side", "head"):
                    steps = "reverse mode: " + _counted(g.primitives())
                else:
                    steps = "  ".join(_step_text(s) for s in g.steps)
                yield (idx, _short(g.location), g.role, "yes" if g.submersive else "NO",
                       _bytes(g.fragment_bytes) if g.fragment_bytes else "-",
                       g.stability or "-", steps)
                yield from rows(g.groups, idx + ".")
        return list(rows(self.groups, ""))

    def _tail(self) -> list[str]:
        lines = [f"plan: {self.plan}"] if self.plan else []
        if self.rules:
            lines.append("spine rules: " + ", ".join(
                f"{p} -> {'/'.join(r)}" for p, r in sorted(self.rules.items())))
        if self.error is not None:
            lines.append("")
            lines.append(f"error: {type(self.error).__name__}")
            lines.extend("  " + ln for ln in str(self.error).splitlines())
        elif self.fragment_error is not None:
            lines.append("")
            lines.append("first layer that needs a fragment (fragments=False would raise):")
            lines.extend("  " + ln for ln in str(self.fragment_error).splitlines())
        if self.suggestion:
            lines.append(f"suggestion: {self.suggestion}")
        lines.extend(f"note: {n}" for n in self.notes)
        return lines

    def __str__(self) -> str:
        header = ("#", "location", "role", "submersive", "fragments", "stability", "steps")
        rows = [header, *self._rows()]
        widths = [max(len(r[c]) for r in rows) for c in range(len(header) - 1)]
        lines = [self._headline(), ""]
        for r in rows:
            cells = [c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)]
            lines.append("  ".join([*cells, r[-1]]))
        lines.append("")
        lines.extend(self._tail())
        return "\n".join(lines).rstrip() + "\n"

    def __rich__(self):  # pragma: no cover - optional dependency, display only
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        table = Table(title=self._headline(), title_justify="left")
        for col in ("#", "location", "role", "submersive", "fragments", "steps"):
            table.add_column(col, overflow="fold")
        for r in self._rows():
            style = "red" if r[3] == "NO" else None
            table.add_row(*r, style=style)
        return Group(table, Text("\n".join(self._tail())))


_TREATMENTS = {"reversible": "reversible backprop", "mixed": "Moonwalk (mixed phase 1, sweep)",
               "forward": "forward phase 1, sweep",
               "checkpointed": "reverse mode, loops inverted or checkpointed",
               "reverse": "reverse mode (jax.grad's)"}
_NO_SWEEP = ("reversible", "checkpointed", "reverse")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _counted(names) -> str:
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return ", ".join(n if c == 1 else f"{n} x{c}" for n, c in counts.items())


def _short(location: str) -> str:
    """``location`` with its file relative to the working directory when inside it."""
    path, sep, rest = location.partition(":")
    if sep and os.path.isabs(path):
        rel = os.path.relpath(path)
        if not rel.startswith(".."):
            return rel + sep + rest
    return location


def _step_text(s: StepInfo) -> str:
    prims = ",".join(s.primitives)
    if s.kind == "spine":
        return f"{prims}[{s.rule}]"
    if s.kind == "region":
        return f"{prims}[elementwise]"
    if s.kind == "fragment":
        return f"{prims}[fragment {_bytes(s.fragment_bytes)}]"
    return f"{prims}({s.kind})"


# -- from sweep Steps to groups --------------------------------------------------------

_LOC = re.compile(r"^(?P<file>.*?):(?P<line>\d+)(?::\d+)? \((?P<fn>.*)\)$")


def _line_key(location: str) -> str:
    """``file:line (function)`` of a ``file:line:col (function)`` location."""
    m = _LOC.match(location)
    return f"{m['file']}:{m['line']} ({m['fn']})" if m else location


def _prim_name(node) -> str:
    if node.primitive.name in ("jit", "pjit"):
        return f"custom_vijp:{node.params.get('name', '?')}"
    return node.primitive.name


def _family(step) -> str:
    """The rule family that handled a sweep step."""
    if step.kind == "region":
        return "elementwise"
    if step.kind in ("side", "head"):
        return "reverse mode"
    if step.kind == "fragment":
        return "fragment"
    if step.kind == "scan":
        return "scan"
    if step.rule == "slice partition":
        return "structural"
    node = step.nodes[0]
    if node.primitive.name in ("jit", "pjit") and node.params.get("name") in G.CUSTOM_BLOCKS:
        return "custom_vijp"
    rule = vijp_rules.get(node.primitive)
    module = getattr(getattr(rule, "vijp", None), "__module__", "") or ""
    if module == "moonjax._src.rules":
        return "register_vijp"  # the wrapper register_vijp builds
    if module.startswith("moonjax._src.rules."):
        return module.rsplit(".", 1)[1]
    return module or step.rule or "?"


def _info(step) -> StepInfo:
    return StepInfo(step.kind, tuple(_prim_name(n) for n in step.nodes), _family(step),
                    where(step.nodes[0].source_info) if step.nodes else "<unknown location>",
                    int(step.fragment_bytes))


def _groups(steps) -> tuple[LayerGroup, ...]:
    """Group sweep steps per source line (consecutive) and per scan."""
    out: list[LayerGroup] = []
    current: list[StepInfo] = []

    def close():
        if current:
            kinds = {s.kind for s in current}
            role = ("spine" if kinds & set(_SPINE_KINDS) else
                    "side" if "side" in kinds else "head")
            frag = sum(s.fragment_bytes for s in current)
            out.append(LayerGroup(_line_key(current[0].location), role,
                                  "fragment" not in kinds, tuple(current), frag))
            current.clear()

    steps = list(steps)
    for k, step in enumerate(steps):
        if step.kind == "region" and k and steps[k - 1].kind == "fragment" and any(
                n is steps[k - 1].nodes[0] for n in step.nodes):
            # the region was crossed with the stored fragment: one fragment step
            prev = current.pop()
            current.append(dataclasses.replace(
                prev, primitives=tuple(_prim_name(n) for n in step.nodes)))
            continue
        if step.kind == "scan":
            close()
            node = step.nodes[0]
            inner = _groups(step.inner)
            length = int(node.params.get("length", 1))
            out.append(LayerGroup(_line_key(where(node.source_info)), "scan",
                                  all(g.submersive for g in inner), (),
                                  length * sum(g.fragment_bytes for g in inner), length,
                                  inner))
            continue
        info = _info(step)
        same_line = current and _line_key(current[0].location) == _line_key(info.location)
        # a step identical to one already in the group is the next layer on that line
        repeated = info.kind in _SPINE_KINDS and any(
            (s.kind, s.primitives, s.location) == (info.kind, info.primitives, info.location)
            for s in current)
        if not same_line or repeated:
            close()
        current.append(info)
    close()
    return tuple(out)


def _amplifies(group: LayerGroup) -> bool:
    """Whether a group's swept steps can amplify rounding (solve with a weight, divide
    by a derivative)."""
    if group.role == "scan":
        return any(_amplifies(g) for g in group.groups)
    return any((s.kind == "region" and not set(s.primitives) <= S.SHIFTS)
               or (s.kind == "spine" and set(s.primitives) & S.SOLVES) for s in group.steps)


def _with_stability(groups, mode: str, anchor_every) -> tuple[LayerGroup, ...]:
    """The groups with their ``stability`` filled in (see ``LayerGroup``)."""

    out = []
    for g in groups:
        if g.role in ("side", "head") or not g.submersive:
            label = "exact"
        elif not _amplifies(g):
            label = "volume-preserving"
        elif g.role == "scan" and mode == "mixed" and anchor_every == "auto":
            # every sqrt(length) steps at most after a known leaky slope, else every
            # AUTO_ANCHOR (moonjax._src.moonwalk._auto_interval)
            most = max(AUTO_ANCHOR, round(g.length ** 0.5))
            label = f"anchored (auto, every <= {most})"
        elif g.role == "scan" and mode == "mixed" and anchor_every is not None:
            k = int(anchor_every)
            k = max(d for d in range(1, min(k, g.length) + 1) if g.length % d == 0)
            label = f"anchored every {k}" if k < g.length else "drift-checked"
        else:
            label = "drift-checked"
        inner = _with_stability(g.groups, mode, None) if g.groups else ()
        out.append(dataclasses.replace(g, stability=label, groups=inner))
    return tuple(out)


def _rules(groups) -> dict[str, tuple[str, ...]]:
    rules: dict[str, list[str]] = {}
    for top in groups:
        for g in top.walk():
            for s in g.steps:
                if s.kind not in ("spine", "region", "fragment"):
                    continue
                for p in s.primitives:
                    fams = rules.setdefault(p, [])
                    if s.rule not in fams:
                        fams.append(s.rule)
    return {k: tuple(v) for k, v in rules.items()}


# -- arguments, as moonwalk_grad reads them ---------------------------------------------


def _is_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic, float,
                             int, complex))


def _dtype(leaf):
    return leaf.dtype if isinstance(leaf, jax.ShapeDtypeStruct) else jnp.result_type(leaf)


def _is_float(leaf) -> bool:
    return _is_array(leaf) and jnp.issubdtype(_dtype(leaf), jnp.inexact)


def _index_tuple(nums, nargs) -> tuple[int, ...]:
    nums = (nums,) if isinstance(nums, int) else tuple(nums)
    return tuple(int(a) % nargs for a in nums)


class _Layout:
    """Flat leaves of ``(args, kwargs)``: which are dynamic, stream, parameters."""

    def __init__(self, args, kwargs):
        leaves, self.treedefs = [], []
        for a in (*args, kwargs):
            lv, td = jax.tree_util.tree_flatten(a)
            leaves.append(lv)
            self.treedefs.append(td)
        self.offsets = list(itertools.accumulate([0] + [len(lv) for lv in leaves]))
        self.flat = list(itertools.chain.from_iterable(leaves))
        self.dyn_ix = [j for j, leaf in enumerate(self.flat) if _is_array(leaf)]
        self.nargs = len(args)
        self.stream: set[int] = set()
        self.params: set[int] = set()

    def set_roles(self, argnums, stream_argnums) -> None:
        """Mark the stream and parameter leaves, as ``moonwalk_grad`` chooses them
        (call once its own checks of ``argnums`` passed)."""
        nargs = self.nargs
        diff = _index_tuple(argnums, nargs)
        if stream_argnums is None:  # the argument after those in argnums
            rest = [i for i in range(nargs) if i not in diff]
            after = [i for i in rest if i > max(diff)]
            stream_ix = tuple((after or rest)[:1])
        else:
            stream_ix = _index_tuple(stream_argnums, nargs)
        self.stream = {j for i in stream_ix for j in range(self.offsets[i], self.offsets[i + 1])
                       if _is_float(self.flat[j])}
        self.params = {j for i in diff for j in range(self.offsets[i], self.offsets[i + 1])}

    def dynamic(self):
        return [self.flat[j] for j in self.dyn_ix]

    def call(self, fun, dyn):
        vals = list(self.flat)
        for j, v in zip(self.dyn_ix, dyn, strict=True):
            vals[j] = v
        rebuilt = [jax.tree_util.tree_unflatten(td, vals[self.offsets[i]:self.offsets[i + 1]])
                   for i, td in enumerate(self.treedefs)]
        return fun(*rebuilt[:-1], **rebuilt[-1])


# -- check -----------------------------------------------------------------------------


def _where_in(error) -> tuple[str | None, str | None]:
    """The primitive and location an equation error names (see ``errors.equation_error``)."""
    text = str(error)
    prim = re.search(r"^\s*primitive: (.+)$", text, re.M)
    loc = re.search(r"^\s*at: (.+)$", text, re.M)
    return (prim[1].strip() if prim else None), (loc[1].strip() if loc else None)


def _suggest(error) -> str | None:
    for cls, text in _SUGGESTIONS.items():
        if isinstance(error, cls):
            return text
    return None


def _analyse(loss, layout: _Layout, has_aux: bool, mode: str, fragments: bool):
    """Run the sweep on the flattened loss under ``jax.make_jaxpr`` (tracing only).

    Returns ``(steps, error, fragment_error)``: the sweep's Steps (of the run that
    stores fragments, when one is needed), the error that stopped it and, when
    fragments were needed, the error a sweep without them raised.
    """
    result: dict[str, Any] = {"steps": [], "error": None, "fragment_error": None}

    def run_sweep(dyn, fragments_arg):
        def loss_only(*d):
            out = layout.call(loss, d)
            return out[0] if has_aux else out

        closed = jax.make_jaxpr(loss_only)(*dyn)
        graph, consts = G.flatten(closed)
        nc = len(consts)
        stream = [False] * nc + [j in layout.stream for j in layout.dyn_ix]
        params = [False] * nc + [j in layout.params for j in layout.dyn_ix]
        known = {nc + k: jnp.zeros(jnp.shape(x), x.dtype)
                 for k, (j, x) in enumerate(zip(layout.dyn_ix, dyn, strict=True))
                 if j in layout.stream}
        steps: list = []
        token = S.REPORT.set(steps)
        try:
            S.sweep(graph, list(consts) + list(dyn), stream, known, head=True,
                    params=params, fragments=fragments_arg)
        finally:
            S.REPORT.reset(token)
            result["steps"] = steps

    def traced(*dyn):
        try:
            run_sweep(dyn, None)
        except (NotSubmersiveError, UnsupportedPrimitiveError, SpineStructureError) as e:
            if not fragments:  # mixed and forward phase 1 record fragments alike
                raise
            result["fragment_error"] = e
            run_sweep(dyn, S.Collect())
        return jnp.zeros(())

    try:
        jax.make_jaxpr(traced)(*layout.dynamic())
    except MoonjaxError as e:
        result["error"] = e
    return result["steps"], result["error"], result["fragment_error"]


def check(
    loss: Callable,
    *args: Any,
    argnums: int | Sequence[int] = 0,
    stream_argnums: int | Sequence[int] | None = None,
    has_aux: bool = False,
    mode: str = "auto",
    fragments: bool = True,
    anchor_every: int | str | None = "auto",
    **kwargs: Any,
) -> CheckReport:
    """Check, without running it, how Moonwalk differentiates ``loss(*args, **kwargs)``.

    Traces ``moonjax.moonwalk_grad(loss, argnums, has_aux, stream_argnums=...,
    mode=..., fragments=...)(*args, **kwargs)`` with ``jax.make_jaxpr`` — nothing
    is computed or compiled, so ``args`` may be ``jax.ShapeDtypeStruct`` s — and
    reports whether that succeeds, the first error otherwise (primitive, the user's
    ``file:line`` and a suggested fix), the sweep's decisions per layer group (spine,
    side branch, head; the vijp rule of each spine primitive) and the fragments phase
    1 stores for non-submersive layers.

    Args:
      loss: the loss, as given to ``moonwalk_grad``.
      *args: its positional arguments (arrays, pytrees, or ``ShapeDtypeStruct`` s).
      argnums: as in ``moonwalk_grad``.
      stream_argnums: as in ``moonwalk_grad``.
      has_aux: as in ``moonwalk_grad``.
      mode: as in ``moonwalk_grad``.
      fragments: as in ``moonwalk_grad``.
      anchor_every: as in ``moonwalk_grad``.
      **kwargs: keyword arguments of ``loss``.

    Returns:
      A ``CheckReport``; ``report.ok`` says whether ``moonwalk_grad`` works.

    Example:
      >>> import jax.numpy as jnp, moonjax
      >>> def loss(w, x):
      ...     return jnp.sum(jnp.tanh(x @ w) ** 2)
      >>> report = moonjax.check(loss, jnp.eye(3), jnp.ones((2, 3)))
      >>> report.ok, report.submersive, report.rules["dot_general"]
      (True, True, ('linear',))
    """
    from moonjax._src.api import moonwalk_grad

    notes: list[str] = []
    error: MoonjaxError | None = None
    layout = None
    try:
        grad_fn = moonwalk_grad(loss, argnums, has_aux, stream_argnums=stream_argnums,
                                mode=mode, fragments=fragments, anchor_every=anchor_every)
        layout = _Layout(args, kwargs)
        token = S.REPORT.set(None)  # the steps come from the analysis trace below
        try:
            jax.make_jaxpr(lambda *dyn: layout.call(grad_fn, dyn))(*layout.dynamic())
        finally:
            S.REPORT.reset(token)
    except MoonjaxError as e:
        error = e

    steps, analysis_error, fragment_error = [], None, None
    plan, treatment = None, mode
    if layout is not None and not isinstance(error, (ArgumentError, LossShapeError)):
        layout.set_roles(argnums, stream_argnums)
        plan = _planned(loss, layout, has_aux)
        if mode == "auto" and plan is not None:
            treatment = P.RUNS[plan.treatment]
        # reverse mode runs no sweep: the sweep's analysis (as mixed mode would run it)
        # shows the layers, and what it would record is not stored
        steps, analysis_error, fragment_error = _analyse(
            loss, layout, has_aux, "mixed" if treatment in _NO_SWEEP else treatment,
            fragments)
        if treatment in _NO_SWEEP:
            fragment_error = None
        if error is None and analysis_error is not None:  # pragma: no cover - divergence
            notes.append(f"the analysis trace stopped early ({analysis_error!r}); the "
                         "table may be incomplete")
    groups = _with_treatments(_with_stability(_groups(steps), treatment, anchor_every),
                              plan, mode, treatment, anchor_every, fragments)
    if treatment in _NO_SWEEP:
        groups = _without_fragments(groups)
    total = sum(g.fragment_bytes for g in groups)
    submersive = error is None and fragment_error is None and total == 0
    primitive = location = suggestion = None
    if error is not None:
        primitive, location = _where_in(error)
        suggestion = _suggest(error)
    elif fragment_error is not None:
        primitive, location = _where_in(fragment_error)
        suggestion = ("fine as is: phase 1 stores the fragments. To store none, use "
                      "invertible or dimension-lowering layers from moonjax.nn there, or "
                      "write their vijp with moonjax.custom_vijp")
    return CheckReport(
        ok=error is None, error=error, mode=mode, fragments=fragments, groups=groups,
        rules=_rules(groups), submersive=submersive, fragment_bytes=total,
        fragment_error=fragment_error, primitive=primitive, location=location,
        suggestion=suggestion, notes=tuple(notes), treatment=treatment,
        plan=_plan_text(plan, mode, treatment))


def _planned(loss, layout: _Layout, has_aux: bool) -> P.Plan | None:
    """The plan of the loss (``None`` if it cannot be traced: the error says why)."""
    def loss_only(*d):
        out = layout.call(loss, d)
        return out[0] if has_aux else out

    try:
        graph, consts = G.flatten(jax.make_jaxpr(loss_only)(*layout.dynamic()))
    except (MoonjaxError, TypeError, ValueError):
        return None
    nc = len(consts)
    return P.analyse(graph, [nc + k for k, j in enumerate(layout.dyn_ix)
                             if j in layout.stream])


def _plan_text(plan: P.Plan | None, mode: str, treatment: str) -> str:
    if plan is None:
        return ""
    if mode == "auto":
        return f"{_TREATMENTS[treatment]}: {plan.reason}"
    return f"mode={mode!r} forces {_TREATMENTS[treatment]} (the default would choose " \
           f"{_TREATMENTS[P.RUNS[plan.treatment]]}: " \
           f"{plan.reason})"


def _without_fragments(groups):
    return tuple(dataclasses.replace(
        g, fragment_bytes=0, submersive=True, groups=_without_fragments(g.groups),
        steps=tuple(dataclasses.replace(st, fragment_bytes=0) for st in g.steps))
        for g in groups)


def _exact(groups):
    """The groups as reverse mode differentiates them: exact, nothing amplified."""
    return tuple(dataclasses.replace(g, stability="exact", groups=_exact(g.groups))
                 for g in groups)


def _with_treatments(groups, plan: P.Plan | None, mode: str, treatment: str,
                     anchor_every, fragments: bool = True):
    """The scan groups with the plan's treatment of their loop."""
    if plan is None:
        return groups
    loops = iter(plan.loops)  # the top-level scan groups are the plan's loops, in order
    out = []
    for g in groups:
        lp = next(loops, None) if g.role == "scan" else None
        if lp is not None and _line_key(lp.where) != g.location:  # pragma: no cover
            lp = None
        held = None if lp is None else (
            lp.anchor_every if treatment == "checkpointed" and lp.treatment == P.CHECKPOINTED
            else fallback_interval(lp.node, lp.body) if mode == "reversible" and fragments
            else None)  # forced reversible mode checkpoints the loops it cannot invert
        if held is not None:
            g = dataclasses.replace(g, treatment=f"checkpointed reverse mode, the carry kept "
                                    f"every {held} steps, each block recomputed "
                                    f"once ({lp.reason})", stability="exact",
                                    groups=_exact(g.groups))
        elif lp is not None and treatment in _NO_SWEEP and lp.body is None:
            g = dataclasses.replace(g, treatment=f"reverse mode ({lp.reason})",
                                    stability="exact")
        elif lp is not None and treatment in _NO_SWEEP:
            # the anchors reverse.backprop stores for these options
            k = reversible_anchor(lp.body, anchor_every, g.length, recompute=mode == "auto")
            kept = "nothing kept per step" if k is None else f"the carry kept every {k} steps"
            stability = (f"anchored every {k}" if k is not None else "volume-preserving"
                         if lp.body.inversion.amplifier is None else "drift-checked")
            g = dataclasses.replace(g, treatment=f"reversible backprop, {kept} "
                                    f"({lp.reason})", stability=stability)
        elif lp is not None and mode in ("auto", "mixed") and lp.treatment == P.REVERSIBLE:
            g = dataclasses.replace(g, treatment=f"phase 1 inverts it, one carry kept "
                                    f"({lp.reason}); the sweep crosses it")
        elif lp is not None:
            g = dataclasses.replace(g, treatment=f"sweeps its body with a scan "
                                    f"(reversible backprop: {lp.reason})")
        elif treatment in _NO_SWEEP:  # outside the loops: reverse mode, no sweep
            g = dataclasses.replace(g, stability="exact")
        out.append(g)
    return tuple(out)
