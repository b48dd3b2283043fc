"""Showing results: a progress bar, terminal tables, JSON, Markdown and a plot.

``rich`` and ``matplotlib`` are optional (the ``bench`` extra): without ``rich`` the
progress and tables are plain text; without ``matplotlib`` ``--plot`` says how to get it.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, TextIO

from moonjax.bench._measure import format_bytes
from moonjax.bench._methods import METHODS
from moonjax.bench._paper import (
    PAPER_MIXED_CLAIM,
    ForwardComparison,
    MixedComparison,
    forward_comparison,
    mixed_comparison,
)
from moonjax.bench._run import Limit, Results, Row

try:  # optional
    import rich  # noqa: F401

    HAVE_RICH = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_RICH = False


# -- numbers as text ---------------------------------------------------------------------------


def _ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.3g}" if x < 10 else f"{x * 1e3:.0f}"


def _sec(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _err(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isnan(x) or math.isinf(x):
        return str(x)
    return f"{x:.1e}"


ROW_COLUMNS = (
    "model",
    "method",
    "depth",
    "params",
    "ms",
    "time/grad",
    "temp",
    "temp/grad",
    "peak",
    "compile s",
    "rel. error",
    "note",
)


def row_cells(r: Row) -> list[str]:
    note = r.note if r.status != "ok" else ""
    if r.status == "error":
        note = "error: " + note
    return [
        r.model,
        r.method,
        str(r.depth),
        f"{r.params:,}",
        _ms(r.time_s),
        _ratio(r.time_ratio),
        format_bytes(r.temp_bytes),
        _ratio(r.temp_ratio),
        format_bytes(r.peak_bytes),
        _sec(r.compile_s),
        _err(r.grad_error),
        note,
    ]


LIMIT_COLUMNS = ("model", "method", "max depth", "depth/grad", "time/grad", "compiles", "note")


def limit_cells(lim: Limit) -> list[str]:
    depth = (
        "-"
        if lim.max_depth is None
        else (f">={lim.max_depth:,}" if lim.capped else f"{lim.max_depth:,}")
    )
    note = ("error: " + lim.note) if lim.status == "error" else lim.note
    return [
        lim.model,
        lim.method,
        depth,
        (">=" if lim.capped and lim.ratio is not None else "") + _ratio(lim.ratio),
        _ratio(lim.time_ratio),
        str(lim.evaluations or "-"),
        note,
    ]


def _pair(a: str, b: str) -> str:
    return f"{a} / {b}"


FORWARD_COLUMNS = ("model", "depth", "params", "input features", "naive_forward ms",
                   "moonwalk_forward ms", "speed-up", "paper", "temp (naive / moonwalk)",
                   "rel. error (naive / moonwalk)", "note")


def forward_cells(c: ForwardComparison) -> list[str]:
    return [
        c.model,
        str(c.depth),
        f"{c.params:,}",
        f"{c.features:,}",
        _ms(c.naive_s),
        _ms(c.forward_s),
        "-" if c.speedup is None else f"{c.speedup:.1f}x",
        "-" if c.paper is None else f"{c.paper:.0f}x",
        _pair(format_bytes(c.naive_temp), format_bytes(c.forward_temp)),
        _pair(_err(c.naive_error), _err(c.forward_error)),
        c.note,
    ]


MIXED_COLUMNS = ("model", "depth", "backprop ms", "moonwalk_mixed ms", "time/grad",
                 "temp/grad", "max depth/grad", "rel. error (grad / mixed)", "note")


def mixed_cells(c: MixedComparison) -> list[str]:
    return [
        c.model,
        str(c.depth),
        _ms(c.backprop_s),
        _ms(c.mixed_s),
        _ratio(c.time_ratio),
        _ratio(c.temp_ratio),
        (">=" if c.depth_capped and c.depth_ratio is not None else "") + _ratio(c.depth_ratio),
        _pair(_err(c.backprop_error), _err(c.mixed_error)),
        c.note,
    ]


def paper_sections(results: Results) -> list[tuple[str, tuple[str, ...], list[list[str]]]]:
    """The paper's comparisons (``BenchConfig.paper``) as ``(title, columns, cells)``."""
    return [
        (
            "the paper's comparison: moonwalk_forward (batch_axis=0) against naive forward "
            "gradients (paper: 27x at 6 layers, 110x at 60, on a CIFAR-10 RevNet)",
            FORWARD_COLUMNS,
            [forward_cells(c) for c in forward_comparison(results)],
        ),
        (
            f"the paper's comparison: moonwalk_mixed against jax.grad (paper: "
            f"{PAPER_MIXED_CLAIM}; max depth under {format_bytes(results.config.budget)})",
            MIXED_COLUMNS,
            [mixed_cells(c) for c in mixed_comparison(results)],
        ),
    ]


def _check_cells(c: dict[str, Any]) -> list[str]:
    v = c["value"]
    if isinstance(v, dict):
        v = f"{v['method']}: depth {_ratio(v['depth_ratio'])}, time {_ratio(v['time_ratio'])}"
    elif isinstance(v, float):
        v = _ratio(v)
    elif v is None:
        v = "no moonjax mode measured"
    return [c["check"], str(v), "yes" if c["passed"] else "NO"]


# -- progress ------------------------------------------------------------------------------------


class PlainProgress:
    """One line per finished unit on ``stream``."""

    def __init__(self, stream: TextIO | None = None):
        stream = sys.stderr if stream is None else stream
        self.stream, self.total, self.done, self.text = stream, 0, 0, ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start(self, total: int) -> None:
        self.total = total

    def step(self, text: str) -> None:
        self.text = text

    def advance(self, text: str = "") -> None:
        self.done += 1
        print(f"[{self.done}/{self.total}] {text or self.text}", file=self.stream, flush=True)

    def note(self, text: str) -> None:
        print(text, file=self.stream, flush=True)


class RichProgress:
    """A ``rich.progress`` bar with the current step as its description."""

    def __init__(self, stream: TextIO | None = None):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]bench"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.description}"),
            console=Console(file=sys.stderr if stream is None else stream),
            transient=True,
        )
        self._task = None

    def __enter__(self):
        self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self._progress.__exit__(*exc)

    def start(self, total: int) -> None:
        self._task = self._progress.add_task("", total=total)

    def step(self, text: str) -> None:
        self._progress.update(self._task, description=text)

    def advance(self, text: str = "") -> None:
        self._progress.advance(self._task)

    def note(self, text: str) -> None:
        self._progress.console.print(text)


def make_progress(enabled: bool = True, stream: TextIO | None = None):
    """A progress display: rich when available and ``stream`` is a terminal, else plain."""
    stream = sys.stderr if stream is None else stream
    if not enabled:
        from moonjax.bench._run import _Silent

        class _Ctx(_Silent):
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        return _Ctx()
    if HAVE_RICH and getattr(stream, "isatty", lambda: False)():
        return RichProgress(stream)
    return PlainProgress(stream)


# -- tables ------------------------------------------------------------------------------------


def _header(results: Results) -> str:
    m = results.meta
    c = results.config
    return (
        f"moonjax {m['moonjax']} / jax {m['jax']} on {m['platform']} ({m['device']}, "
        f"{m['cpu_count']} CPU cores); budget {format_bytes(c.budget)}, "
        f"{c.repeats} timed runs"
    )


def _skipped_notes(results: Results) -> list[str]:
    """One line per (model, method) skipped at some depths, instead of empty rows."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for r in results.rows:
        if r.status == "skipped":
            groups.setdefault((r.model, r.method), []).append(r)
    notes = []
    for (model, method), rs in groups.items():
        depths = ", ".join(str(r.depth) for r in rs)
        limit = METHODS[method].max_params
        why = (
            f"more than {limit:,} parameters (its cost: {METHODS[method].cost})"
            if limit is not None
            else rs[0].note  # it says which limit and why
        )
        notes.append(f"{method} not run on {model} at depth {depths}: {why}")
    return notes


def _drop_empty_notes(cols, cells):
    if cols[-1] == "note" and not any(row[-1] for row in cells):
        return cols[:-1], [row[:-1] for row in cells]
    return cols, cells


def sections(results: Results) -> list[tuple[str, tuple[str, ...], list[list[str]]]]:
    """The report as ``(title, columns, rows of cells)`` tables."""
    tables = [
        (
            "gradient time, memory and error per depth",
            ROW_COLUMNS,
            [row_cells(r) for r in results.rows if r.status != "skipped"],
        ),
        (
            f"largest depth under {format_bytes(results.config.budget)} "
            "(peak = arguments + outputs + temporaries; time/grad at the deepest timed depth)",
            LIMIT_COLUMNS,
            [limit_cells(lim) for lim in results.limits if lim.status != "skipped"],
        ),
        *(paper_sections(results) if results.config.paper else []),
        (
            "headline checks",
            ("check", "measured", "met"),
            [_check_cells(c) for c in results.checks],
        ),
    ]
    return [(title, *_drop_empty_notes(cols, cells)) for title, cols, cells in tables]


def all_notes(results: Results) -> list[str]:
    skipped_limits = [
        f"{lim.method} on {lim.model}: {lim.note}"
        for lim in results.limits
        if lim.status == "skipped"
        and not any(
            r.model == lim.model and r.method == lim.method and r.status == "skipped"
            for r in results.rows
        )
    ]
    return results.notes + _skipped_notes(results) + skipped_limits


def print_report(results: Results, stream: TextIO | None = None) -> None:
    """Tables on the terminal (rich if installed, aligned plain text otherwise)."""
    stream = sys.stdout if stream is None else stream
    if HAVE_RICH:
        from rich.console import Console
        from rich.table import Table

        tty = getattr(stream, "isatty", lambda: False)()
        console = Console(file=stream, width=None if tty else 200)
        console.print(_header(results))
        for title, cols, cells in sections(results):
            if not cells:
                continue
            table = Table(title=title, title_justify="left")
            for col in cols:
                numeric = col not in ("model", "method", "note", "check", "measured")
                table.add_column(col, justify="right" if numeric else "left", overflow="fold")
            for row in cells:
                table.add_row(*row)
            console.print(table)
        for note in all_notes(results):
            console.print(f"note: {note}", markup=False)
        return
    print(_header(results), file=stream)
    for title, cols, cells in sections(results):
        if cells:
            print(f"\n{title}", file=stream)
            print(plain_table(cols, cells), file=stream)
    for note in all_notes(results):
        print(f"note: {note}", file=stream)


def plain_table(cols, cells) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(cols, *cells, strict=True)]
    line = lambda row: "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True))
    rule = ["-" * w for w in widths]
    return "\n".join(line(r).rstrip() for r in [cols, rule, *cells])


def markdown(results: Results) -> str:
    """The tables as GitHub Markdown (what ``docs/benchmarks.md`` shows)."""
    parts = [_header(results)]
    for title, cols, cells in sections(results):
        if not cells:
            continue
        parts += [
            "",
            f"**{title}**",
            "",
            "| " + " | ".join(cols) + " |",
            "|" + "|".join("---" for _ in cols) + "|",
        ]
        parts += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    notes = all_notes(results)
    if notes:
        parts += [""] + [f"* {n}" for n in notes]
    return "\n".join(parts) + "\n"


def write_json(results: Results, path: str) -> None:
    def clean(x):
        if isinstance(x, float) and (math.isnan(x) or math.isinf(x)):
            return str(x)  # strict JSON has no NaN/Infinity
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    with open(path, "w") as f:
        json.dump(clean(results.to_json()), f, indent=1)
        f.write("\n")


# -- plot ------------------------------------------------------------------------------------


class PlotUnavailable(RuntimeError):
    pass


def plot(results: Results, path: str) -> None:
    """Time and XLA temp bytes against depth, log-log, one column per model."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: "
            "pip install 'moonjax[bench]' (or pip install matplotlib)"
        ) from None
    models = list(dict.fromkeys(r.model for r in results.rows))
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 7), squeeze=False)
    for j, model in enumerate(models):
        rows = [r for r in results.rows if r.model == model and r.status == "ok"]
        for method in dict.fromkeys(r.method for r in rows):
            pts = sorted((r.depth, r.time_s, r.temp_bytes) for r in rows if r.method == method)
            depths = [p[0] for p in pts]
            axes[0][j].plot(depths, [p[1] for p in pts], "o-", label=method)
            axes[1][j].plot(depths, [max(p[2], 1) for p in pts], "o-", label=method)
        axes[0][j].set_title(model)
        axes[0][j].set_ylabel("gradient time (s)")
        axes[1][j].set_ylabel("XLA temp bytes")
        for ax in (axes[0][j], axes[1][j]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("depth")
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(_header(results), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
