"""The ``moonjax`` command: ``moonjax <command> [flags]``.

``COMMANDS`` lists the sub-commands; each names the module that adds its flags
and runs it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NamedTuple


class Command(NamedTuple):
    """A sub-command: its module has ``add_arguments(parser)`` and ``run_from_args(args)``."""

    name: str
    module: str
    help: str
    description: str


COMMANDS: list[Command] = [
    Command("bench", "moonjax.bench._cli",
            "compare Moonwalk with backprop and friends: time, memory, depth",
            "Time, XLA memory, gradient error and the largest depth under a memory budget, "
            "for Moonwalk and the baselines, on one device in one process."),
    Command("train", "moonjax.train._cli",
            "train an invertible classifier (digits or your .npz) with Moonwalk gradients",
            "Train an i-RevNet-style classifier with Adam, Moonwalk or backprop gradients, "
            "data parallel over all devices, with checkpoints."),
    Command("check", "moonjax._src.check_cli",
            "check a model without running it: submersive layers, vijp rules, fragments, "
            "the first unsupported primitive",
            ""),  # the module's DESCRIPTION
]


def _add(sub: argparse._SubParsersAction, command: Command) -> None:
    module = importlib.import_module(command.module)
    own = getattr(module, "DESCRIPTION", None)  # laid out by the module: keep its lines
    p = sub.add_parser(
        command.name, help=command.help, description=own or command.description,
        formatter_class=argparse.RawDescriptionHelpFormatter if own else
        argparse.HelpFormatter)
    module.add_arguments(p)
    p.set_defaults(run=module.run_from_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moonjax", description="Moonwalk (inverse-forward differentiation) for JAX."
    )
    from moonjax import __version__

    parser.add_argument("--version", action="version", version=f"moonjax {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="<command>")
    for command in COMMANDS:
        _add(sub, command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``moonjax`` command line with ``argv`` (default: ``sys.argv[1:]``)."""
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else sys.argv[1:])
    if not hasattr(args, "run"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # the reader went away (``moonjax check --json | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second one
        return 0


if __name__ == "__main__":
    sys.exit(main())
