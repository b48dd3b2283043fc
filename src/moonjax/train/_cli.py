"""The ``moonjax train`` command line: flags -> ``TrainConfig`` -> ``fit``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from moonjax.train._step import GRADS, MODES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``moonjax train``."""
    from moonjax.train._loop import TrainConfig

    d = TrainConfig()

    def option(flag: str, text: str, **kind) -> None:
        """A flag whose default is ``TrainConfig``'s field of the same name."""
        default = getattr(d, flag.lstrip("-").replace("-", "_"))
        shown = f"{default:g}" if isinstance(default, float) else default
        parser.add_argument(flag, default=default, help=f"{text} (default: {shown})", **kind)

    option("--grad", "how gradients are computed", choices=GRADS)
    option("--mode", "moonwalk_grad's treatment (auto: the plan's; forward: one JVP per "
           "feature)", choices=MODES)
    parser.add_argument(
        "--anchor-every",
        type=_anchor,
        default="auto",
        metavar="K|auto|none",
        help="moonwalk, mixed mode: record an exact cotangent every K blocks "
        "so float32 rounding cannot grow through deep stacks; 'auto' anchors the loops "
        "that can amplify rounding (every 4 blocks, fewer after a known leaky-ReLU "
        "slope), 'none' never (default: auto)",
    )
    option("--epochs", "epochs in all, counting restored ones", type=int)
    option("--batch-size", "examples per step over all devices", type=int)
    option("--lr", "Adam learning rate", type=float)
    option("--depth", "blocks in the invertible body", type=int)
    option("--hidden", "width of the coupling side networks", type=int)
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="feature width of the body (default: the input's, made even)",
    )
    option("--seed", "initialisation and shuffling seed", type=int)
    parser.add_argument(
        "--data",
        metavar="PATH.npz",
        default=None,
        help="train on arrays x, y (optional x_test, y_test) of this file "
        "instead of scikit-learn's digits",
    )
    option("--test-fraction", "held-out share when the data has no test split", type=float)
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        default=None,
        help="save parameters and optimizer state here after every epoch; "
        "if a checkpoint is there, restore it and continue",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="shard each batch over the first N devices (default: all)",
    )
    parser.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first (multi-host; run the "
        "same command on every host)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many steps of this run (smoke tests)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="also write the summary, the per-epoch history and every step's loss as JSON",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--quiet", action="store_true", help="print nothing")


def _anchor(text: str) -> int | str | None:
    if text == "auto":
        return text
    if text == "none":
        return None
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, 'auto' or 'none', got {text!r}")
    return k


def run_from_args(args: argparse.Namespace) -> int:
    """Run ``moonjax train`` for parsed flags; returns the exit status."""
    # LAPACK (the dense vijp's solves) runs in OpenBLAS, whose spin-waiting worker
    # threads fight XLA's on a small machine; one thread is much faster for small solves.
    # It takes effect only if OpenBLAS is not loaded yet. Users can override it.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    import jax

    from moonjax._src.errors import MoonjaxError, from_runtime_error
    from moonjax.train._loop import TrainConfig, fit

    if args.distributed:
        jax.distributed.initialize()
    try:
        config = TrainConfig(
            grad=args.grad,
            mode=args.mode,
            anchor_every=args.anchor_every,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            depth=args.depth,
            hidden=args.hidden,
            width=args.width,
            seed=args.seed,
            data=args.data,
            test_fraction=args.test_fraction,
            checkpoint=args.checkpoint,
            devices=args.devices,
            max_steps=args.max_steps,
            verbose=not args.quiet,
            progress=not args.no_progress,
        )
        result = fit(config)
    except (MoonjaxError, jax.errors.JaxRuntimeError) as e:
        found = e if isinstance(e, MoonjaxError) else from_runtime_error(e)
        if found is None:
            raise
        print(f"moonjax train: error: {found}", file=sys.stderr)
        return 2
    if args.json and jax.process_index() == 0:
        with open(args.json, "w") as f:
            json.dump(result.summary(), f, indent=2)
    return 0
