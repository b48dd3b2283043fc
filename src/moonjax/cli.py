"""The ``moonjax`` command: ``moonjax <command> [flags]``.

Each command is one small function that adds its sub-parser and sets ``run`` to the
function that executes it; :data:`COMMANDS` lists them. Commands import their
implementation lazily, so ``moonjax --help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence


def _bench(sub: argparse._SubParsersAction) -> None:
    from moonjax.bench._cli import add_arguments, run_from_args

    p = sub.add_parser(
        "bench",
        help="compare Moonwalk with backprop and friends: time, memory, depth",
        description="Time, XLA memory, gradient error and the largest depth under a memory "
        "budget, for Moonwalk and the baselines, on one device in one process.",
    )
    add_arguments(p)
    p.set_defaults(run=run_from_args)


# Adding a command (``train``, ``check``) is one more function like ``_bench``.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_bench]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moonjax", description="Moonwalk (inverse-forward differentiation) for JAX."
    )
    from moonjax import __version__

    parser.add_argument("--version", action="version", version=f"moonjax {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``moonjax`` command line with ``argv`` (default: ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
