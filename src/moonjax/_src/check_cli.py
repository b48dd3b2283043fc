"""The ``moonjax check`` command line: ``moonjax check module:function``.

``DESCRIPTION`` states the contract of the target. This module only parses flags
and loads the target; ``moonjax._src.check`` is imported when the command runs.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Trace moonwalk_grad of a loss, without running it, and report the sweep per layer
group: spine, side branches and head, the vijp rule of each spine primitive, the
fragments phase 1 stores for non-submersive layers, and the first unsupported
primitive or non-submersive layer with its file:line and a fix.

The target names a function that takes no arguments and returns what to check:

  (loss, args)          args: a tuple of the positional arguments of loss,
                        e.g. (params, x, y)
  (loss, args, kwargs)  plus a dict of keyword arguments of loss

Write it as package.module:function (imported like `python -m`, with the working
directory on sys.path) or path/to/file.py:function (run like a script, with the
file's directory on sys.path). The arguments may be arrays or jax.ShapeDtypeStruct;
nothing is computed.

exit status: 0 moonwalk_grad can differentiate the model; 1 it cannot (with --strict:
also when phase 1 would store fragments); 2 the target cannot be loaded or breaks
the contract.
"""


class TargetError(Exception):
    """The target of ``moonjax check`` cannot be loaded or breaks the contract."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``moonjax check``."""
    parser.add_argument(
        "target",
        metavar="module:function",
        help="a function returning (loss, args) or (loss, args, kwargs); "
        "`pkg.module:make` or `path/to/file.py:make`",
    )
    parser.add_argument("--argnums", default="0", metavar="N[,M]",
                        help="argument(s) to differentiate, as in jax.grad (default: 0)")
    parser.add_argument("--stream-argnums", default=None, metavar="N[,M]",
                        help="argument(s) holding the network input (default: the first "
                        "argument after argnums)")
    parser.add_argument("--has-aux", action="store_true",
                        help="the loss returns (loss, aux)")
    parser.add_argument("--mode", default="auto",
                        choices=("auto", "mixed", "reversible", "forward"),
                        help="the treatment to check (default: auto, the plan's choice)")
    parser.add_argument("--no-fragments", action="store_true",
                        help="check with fragments=False: non-submersive layers are errors")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 also when phase 1 would store fragments")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _int_list(text: str | None):
    if text is None:
        return None
    try:
        nums = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise TargetError(f"expected integers like 0 or 0,1; got {text!r}") from e
    return nums[0] if len(nums) == 1 else nums


def load_target(target: str) -> Callable[[], Any]:
    """The function named by ``module:function`` or ``path/to/file.py:function``."""
    where_, sep, name = target.rpartition(":")
    if not sep or not where_ or not name:
        raise TargetError(f"expected module:function or path/to/file.py:function, got "
                          f"{target!r}")
    if where_.endswith(".py") or "/" in where_ or os.sep in where_:
        path = os.path.abspath(where_)
        if not os.path.isfile(path):
            raise TargetError(f"no such file: {where_}")
        mod_name = "moonjax_check_target_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, os.path.dirname(path))  # as `python file.py` would
        sys.modules[mod_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(mod_name, None)
            raise
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m` would
        try:
            module = importlib.import_module(where_)
        except ModuleNotFoundError as e:
            raise TargetError(f"cannot import {where_!r}: {e}") from e
    obj: Any = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise TargetError(f"{where_} has no attribute {name!r}") from None
    if not callable(obj):
        raise TargetError(f"{target} is not callable")
    return obj


def unpack(result: Any, target: str = "the target"):
    """``(loss, args, kwargs)`` from what the target returned, checking the contract."""
    if not isinstance(result, (tuple, list)) or len(result) not in (2, 3):
        raise TargetError(f"{target} must return (loss, args) or (loss, args, kwargs); got "
                          f"{type(result).__name__}"
                          + (f" of length {len(result)}" if isinstance(result, (tuple, list))
                             else ""))
    loss, args, *rest = result
    kwargs = rest[0] if rest else {}
    if not callable(loss):
        raise TargetError(f"{target}: the loss (first item) is not callable")
    if not isinstance(args, (tuple, list)):
        raise TargetError(f"{target}: args (second item) must be a tuple of the loss's "
                          f"positional arguments, got {type(args).__name__}")
    if not isinstance(kwargs, dict):
        raise TargetError(f"{target}: kwargs (third item) must be a dict, got "
                          f"{type(kwargs).__name__}")
    return loss, tuple(args), kwargs


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``moonjax check`` with parsed flags; returns the exit status."""
    saved_path = list(sys.path)
    try:
        try:
            fn = load_target(args.target)
            loss, loss_args, kwargs = unpack(fn(), args.target)
            argnums = _int_list(args.argnums)
            stream = _int_list(args.stream_argnums)
        except TargetError as e:
            print(f"moonjax check: {e}", file=sys.stderr)
            return EXIT_USAGE
        from moonjax._src.check import check

        try:
            report = check(loss, *loss_args, argnums=argnums, stream_argnums=stream,
                           has_aux=args.has_aux, mode=args.mode,
                           fragments=not args.no_fragments, **kwargs)
        except Exception as e:  # the loss itself failed to trace: show where
            traceback.print_exc()
            print(f"moonjax check: tracing the loss raised {type(e).__name__}: {e}",
                  file=sys.stderr)
            return EXIT_FAILED
    finally:
        sys.path[:] = saved_path
    if args.json:
        print(report.to_json(indent=2))
    else:
        _print(report)
    if not report.ok or (args.strict and not report.submersive):
        return EXIT_FAILED
    return EXIT_OK


def _print(report) -> None:
    if sys.stdout.isatty():
        try:
            from rich.console import Console
        except ImportError:  # pragma: no cover - rich is optional
            pass
        else:  # pragma: no cover - terminal only
            Console().print(report)
            return
    print(report, end="")
