"""The paper's comparisons, measured: ``moonjax bench --paper``.

*Moonwalk: Inverse-Forward Differentiation* (Krylov, Karamzade, Fox;
https://arxiv.org/abs/2402.14212) reports, on a RevNet for CIFAR-10, that Moonwalk's
forward mode computes the gradient 27x faster than naive forward gradients (one JVP per
parameter scalar) at 6 layers and 110x faster at 60, and that its mixed mode takes time
comparable with backprop while keeping a much smaller memory footprint, so that networks
more than twice as deep fit one memory budget.

``paper_config`` is a ``BenchConfig`` that measures those comparisons at sizes a 2-core
CPU affords: ``revnet_mlp`` (additive coupling, the RevNet block with dense side branches)
at width 8 and batch 64, at the paper's depths. Naive forward gradients cost one pass per
parameter, so depth 60 must stay under ``naive_forward``'s 5,000-parameter cap (4,384
parameters at width 8, the narrowest the models allow). ``forward_comparison`` and
``mixed_comparison`` read the measured rows back as one row per (model, depth) with the
paper's figure beside it; the report prints them as two tables.
"""

from __future__ import annotations

import dataclasses
import math

from moonjax.bench._models import MODELS
from moonjax.bench._run import BenchConfig, Results, Row

# the paper's figures: Moonwalk forward mode's speed-up over naive forward gradients
PAPER_FORWARD_SPEEDUP: dict[int, float] = {6: 27.0, 60: 110.0}
PAPER_MIXED_CLAIM = ("time comparable with backprop, a much smaller memory footprint, "
                     "more than 2x the depth under one memory budget")

PAPER_MODEL = "revnet_mlp"
PAPER_METHODS = ("backprop", "naive_forward", "moonwalk_forward", "moonwalk_mixed")
PAPER_WIDTH = 8
PAPER_BATCH = 64


def paper_config(quick: bool = False, **overrides) -> BenchConfig:
    """The paper's comparisons as a ``BenchConfig``; ``overrides`` replace any field.

    Depths 6 and 60, ``revnet_mlp`` at width 8 and batch 64, the methods
    ``backprop``, ``naive_forward``, ``moonwalk_forward`` and ``moonwalk_mixed``, and the
    depth search under the budget (the paper's "twice as deep"). With ``quick``: depth 6
    only, at ``BenchConfig.quick``'s batch, repeats and budget (a smoke test).
    """
    sizes = {"depths": (6,)} if quick else {"depths": tuple(PAPER_FORWARD_SPEEDUP),
                                            "batch": PAPER_BATCH}
    fields = dict(models=(PAPER_MODEL,), methods=PAPER_METHODS, width=PAPER_WIDTH,
                  paper=True, verdicts=False, **sizes)
    fields.update(overrides)
    return BenchConfig.quick(**fields) if quick else BenchConfig(**fields)


@dataclasses.dataclass(frozen=True)
class ForwardComparison:
    """``moonwalk_forward`` against ``naive_forward`` at one (model, depth).

    ``speedup`` is the ratio of their median times; ``paper`` the paper's speed-up at
    this depth (``None`` where it reports none); errors are relative to a float64
    ``jax.grad``.
    """

    model: str
    depth: int
    params: int
    features: int  # entries of one example's input: moonwalk_forward's JVP count
    naive_s: float | None
    forward_s: float | None
    naive_temp: int | None
    forward_temp: int | None
    naive_error: float | None
    forward_error: float | None
    paper: float | None
    note: str = ""

    @property
    def speedup(self) -> float | None:
        if self.naive_s is None or not self.forward_s:
            return None
        return self.naive_s / self.forward_s


@dataclasses.dataclass(frozen=True)
class MixedComparison:
    """``moonwalk_mixed`` against ``backprop`` (``jax.grad``) at one (model, depth).

    ``depth_ratio`` is the ratio of their largest depths under the budget (per model, the
    same on every depth's row; a lower bound when ``depth_capped``).
    """

    model: str
    depth: int
    backprop_s: float | None
    mixed_s: float | None
    time_ratio: float | None
    temp_ratio: float | None
    depth_ratio: float | None
    depth_capped: bool
    backprop_error: float | None
    mixed_error: float | None
    note: str = ""


def _index(results: Results) -> dict[tuple[str, str, int], Row]:
    return {(r.model, r.method, r.depth): r for r in results.rows}


def _ok(rows, model: str, method: str, depth: int) -> Row | None:
    r = rows.get((model, method, depth))
    return r if r is not None and r.status == "ok" else None


def _why_missing(rows, model: str, methods: tuple[str, ...], depth: int) -> str:
    notes = []
    for meth in methods:
        r = rows.get((model, meth, depth))
        if r is None:
            notes.append(f"{meth} not run")
        elif r.status != "ok":
            notes.append(f"{meth} {r.status}: {r.note}")
    return "; ".join(notes)


def _get(row: Row | None, field: str):
    return None if row is None else getattr(row, field)


def forward_comparison(results: Results) -> list[ForwardComparison]:
    """One ``ForwardComparison`` per measured (model, depth)."""
    rows, out = _index(results), []
    for model in results.config.models:
        for depth in results.config.depths:
            naive = _ok(rows, model, "naive_forward", depth)
            fwd = _ok(rows, model, "moonwalk_forward", depth)
            any_row = next((r for r in results.rows if r.model == model and r.depth == depth),
                           None)
            if any_row is None:
                continue
            features = math.prod(MODELS[model].input_shape(any_row.batch, any_row.width)[1:])
            out.append(ForwardComparison(
                model, depth, any_row.params, features,
                _get(naive, "time_s"), _get(fwd, "time_s"),
                _get(naive, "temp_bytes"), _get(fwd, "temp_bytes"),
                _get(naive, "grad_error"), _get(fwd, "grad_error"),
                PAPER_FORWARD_SPEEDUP.get(depth),
                _why_missing(rows, model, ("naive_forward", "moonwalk_forward"), depth)))
    return out


def mixed_comparison(results: Results) -> list[MixedComparison]:
    """One ``MixedComparison`` per measured (model, depth)."""
    rows, out = _index(results), []
    limits = {(lim.model, lim.method): lim for lim in results.limits if lim.status == "ok"}
    for model in results.config.models:
        lim = limits.get((model, "moonwalk_mixed"))
        for depth in results.config.depths:
            base = _ok(rows, model, "backprop", depth)
            mixed = _ok(rows, model, "moonwalk_mixed", depth)
            if base is None and mixed is None and not any(
                    r.model == model and r.depth == depth for r in results.rows):
                continue
            out.append(MixedComparison(
                model, depth, _get(base, "time_s"), _get(mixed, "time_s"),
                _get(mixed, "time_ratio"), _get(mixed, "temp_ratio"),
                _get(lim, "ratio"), bool(lim and lim.capped),
                _get(base, "grad_error"), _get(mixed, "grad_error"),
                _why_missing(rows, model, ("backprop", "moonwalk_mixed"), depth)))
    return out
