"""The ``moonjax bench`` command line: flags → ``BenchConfig`` → run → reports."""

from __future__ import annotations

import argparse
import os
import sys

from moonjax.bench._measure import format_bytes, parse_bytes
from moonjax.bench._methods import METHODS
from moonjax.bench._models import MODELS
from moonjax.bench._paper import PAPER_BATCH, PAPER_METHODS, PAPER_MODEL, PAPER_WIDTH, paper_config
from moonjax.bench._run import (
    QUICK_MODELS,
    BenchConfig,
    parse_int_list,
    parse_name_list,
    run,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``moonjax bench``."""
    d = BenchConfig()
    parser.add_argument(
        "--models",
        default=None,
        metavar="A,B",
        help=f"models to run (default: all = {','.join(MODELS)}; with --quick: "
        f"{','.join(QUICK_MODELS)})",
    )
    parser.add_argument(
        "--methods",
        default=None,
        metavar="A,B",
        help=f"methods to compare (default: all = {','.join(METHODS)}; with --paper: "
        f"{','.join(PAPER_METHODS)}); backprop is always run as the reference",
    )
    parser.add_argument(
        "--depths",
        default=None,
        metavar="N,M",
        help=f"depths to time (default: {','.join(map(str, d.depths))})",
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="feature width (channels) of every model "
        "(default: each model's own: "
        + ", ".join(f"{m.name} {m.width}" for m in MODELS.values())
        + ")",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="batch size of every model (default: each model's own)",
    )
    parser.add_argument(
        "--budget",
        default=None,
        metavar="BYTES",
        help=f"memory budget for the depth search, e.g. 1GiB, 512MiB "
        f"(default: {format_bytes(d.budget)})",
    )
    parser.add_argument(
        "--max-depth",
        type=int,
        default=None,
        help=f"cap of the depth search (default: {d.max_depth})",
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed runs per method (default: {d.repeats})"
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes, one depth, a small budget, four models and no headline verdicts: "
        "a smoke test (under a minute on 2 CPU cores, mostly XLA compile time)",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper's comparisons: moonwalk_forward against naive forward gradients at "
        "its depths 6 and 60 (paper: 27x, 110x) and moonwalk_mixed against jax.grad, each "
        f"figure beside the paper's; {PAPER_MODEL} at width {PAPER_WIDTH}, batch "
        f"{PAPER_BATCH} unless told (about 1.5 minutes on 2 CPU cores; with --quick: depth 6 "
        "at smoke-test sizes)",
    )
    parser.add_argument(
        "--no-reference",
        action="store_true",
        help="skip the float64 reference (no gradient-error column)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown")
    parser.add_argument(
        "--plot",
        metavar="PATH.png",
        help="also plot time and memory against depth (needs matplotlib)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress display")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    fields = dict(seed=args.seed, reference=not args.no_reference)
    optional = dict(
        models=parse_name_list(args.models, MODELS, "model") if args.models else None,
        methods=parse_name_list(args.methods, METHODS, "method") if args.methods else None,
        depths=parse_int_list(args.depths) if args.depths else None,
        width=args.width,
        batch=args.batch,
        budget=parse_bytes(args.budget) if args.budget else None,
        max_depth=args.max_depth,
        repeats=args.repeats,
    )
    fields.update({k: v for k, v in optional.items() if v is not None})
    if args.paper:
        return paper_config(quick=args.quick, **fields)
    fields.setdefault("models", QUICK_MODELS if args.quick else tuple(MODELS))
    fields.setdefault("methods", tuple(METHODS))
    return BenchConfig.quick(**fields) if args.quick else BenchConfig(**fields)


def pin_blas_threads() -> None:
    """Run LAPACK single-threaded unless the user chose otherwise.

    On CPU, ``jnp.linalg.solve``/``qr`` (Moonwalk's dense vijp, the leaky-ReLU inverse of
    ``revbackprop``) are LAPACK calls into OpenBLAS, whose worker threads spin-wait. Next
    to XLA's own threads, or on a busy machine, one small solve then takes tens of
    milliseconds instead of microseconds, and the timings measure the contention. One
    BLAS thread removes it. It only takes effect if OpenBLAS is not loaded yet (JAX loads
    it lazily, at the first LAPACK call).
    """
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def run_from_args(args: argparse.Namespace) -> int:
    from moonjax.bench import _report

    pin_blas_threads()

    try:
        config = config_from_args(args)
    except ValueError as e:
        print(f"moonjax bench: {e}", file=sys.stderr)
        return 2
    if args.plot:  # fail before the run, not after it
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "moonjax bench: --plot needs matplotlib, which is not installed: "
                "pip install 'moonjax[bench]' (or pip install matplotlib)",
                file=sys.stderr,
            )
            return 2
    with _report.make_progress(not args.no_progress) as progress:
        results = run(config, progress)
    _report.print_report(results)
    if args.json:
        _report.write_json(results, args.json)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_report.markdown(results))
    if args.plot:
        _report.plot(results, args.plot)
    return 0
