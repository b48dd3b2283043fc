"""The training loop of ``moonjax train``: a RevNet classifier, optax, data parallel."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import moonjax
from moonjax.models import RevNetClassifier, classifier_loss
from moonjax.nn import ConfigError
from moonjax.train import _checkpoint
from moonjax.train._data import Dataset, load_dataset
from moonjax.train._errors import DataError
from moonjax.train._progress import Progress
from moonjax.train._step import (
    GRADS,
    MODES,
    batch_sharded,
    data_mesh,
    make_train_step,
    put_global,
    replicated,
    to_host,
)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything ``moonjax train`` can be told; the defaults train digits in about 20 s.

    Attributes:
      grad: ``"moonwalk"`` (``moonjax.moonwalk_grad``) or ``"backprop"`` (``jax.grad``).
      mode: ``moonjax.moonwalk_grad``'s ``mode`` for ``grad="moonwalk"``: ``"auto"``
        (the plan's choice; Moonwalk for this classifier, whose leaky-ReLU layers invert
        by division), ``"mixed"``, ``"reversible"``, ``"forward"``.
      anchor_every: for ``grad="moonwalk"``, ``mode="mixed"``: record an exact cotangent
        every ``k`` blocks (an int, ``"auto"``: every 4 blocks of the loops that can
        amplify rounding, the default, or ``None``: never) and restart the sweep there, so
        float32 rounding cannot grow through deep stacks (see ``moonjax.moonwalk_grad``).
      epochs: passes over the training split (in all, counting restored ones).
      batch_size: examples per step, over all devices (a multiple of their number).
      lr: Adam's learning rate.
      depth: blocks in the classifier's invertible body.
      hidden: width of the coupling side networks.
      width: feature width of the body (``None``: the input's, rounded up to even).
      seed: seed of the initialisation and of the shuffling.
      data: a ``.npz`` with ``x`` and ``y`` (see ``load_dataset``); ``None``: digits.
      test_fraction: held-out share when the data has no test split.
      checkpoint: a directory; the state is saved there after every epoch and, if a
        checkpoint is already there, restored first so training continues.
      devices: number of devices to shard the batch over (``None``: all).
      max_steps: stop after this many steps of this run (smoke tests); a partial epoch
        is evaluated but not checkpointed.
      verbose: print the per-epoch lines and the summary.
      progress: show a progress bar (rich, when installed).
    """

    grad: str = "moonwalk"
    mode: str = "auto"
    anchor_every: int | str | None = "auto"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 1e-3
    depth: int = 8
    hidden: int = 64
    width: int | None = None
    seed: int = 0
    data: str | None = None
    test_fraction: float = 0.2
    checkpoint: str | None = None
    devices: int | None = None
    max_steps: int | None = None
    verbose: bool = True
    progress: bool = True

    def __post_init__(self):
        if self.grad not in GRADS:
            raise ConfigError(f"grad must be one of {GRADS}; got {self.grad!r}")
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {MODES}; got {self.mode!r}")
        for name in ("epochs", "batch_size", "depth", "hidden"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0; got {self.lr}")
        if (
            self.anchor_every is not None
            and self.anchor_every != "auto"
            and not (isinstance(self.anchor_every, int) and self.anchor_every >= 1)
        ):
            raise ConfigError(
                f"anchor_every must be a positive int, 'auto' or None; got {self.anchor_every!r}"
            )
        for name in ("max_steps", "devices"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1; got {getattr(self, name)}")


@dataclasses.dataclass
class TrainResult:
    """What ``fit`` returns.

    Attributes:
      config: the run's configuration.
      graphdef: the model's ``nnx.GraphDef``; ``nnx.merge(graphdef, params)`` rebuilds it.
      params: the trained parameters (an ``nnx.State``).
      history: one dict per epoch: ``epoch``, ``steps``, ``train_loss``,
        ``train_accuracy``, ``test_loss``, ``test_accuracy``, ``seconds`` (training time
        so far), including epochs restored from a checkpoint.
      step_losses: the loss of every step this run took (not restored ones).
      start_epoch: the epoch training started from (``> 0`` after a restore).
      num_params: number of parameters.
      devices: number of devices the batch was sharded over.
      temp_bytes: XLA's temporary memory of one compiled train step
        (``memory_analysis().temp_size_in_bytes``), ``None`` if the backend does not say.
      compile_seconds: time to trace, lower and compile the train step.
      train_seconds: time spent in train steps (compiled, after the first call).
      wall_seconds: time of the whole ``fit``, data loading and evaluation included.
    """

    config: TrainConfig
    graphdef: Any
    params: Any
    history: list[dict[str, float]]
    step_losses: list[float]
    start_epoch: int
    num_params: int
    devices: int
    temp_bytes: int | None
    compile_seconds: float
    train_seconds: float
    wall_seconds: float

    @property
    def test_accuracy(self) -> float:
        """Held-out accuracy after the last epoch."""
        return self.history[-1]["test_accuracy"] if self.history else float("nan")

    def summary(self) -> dict[str, Any]:
        """A JSON-ready dict: the configuration, the final metrics, time, memory, the
        per-epoch history and the loss of every step this run took."""
        last = self.history[-1] if self.history else {}
        return {
            "config": dataclasses.asdict(self.config),
            "num_params": self.num_params,
            "devices": self.devices,
            "epochs": len(self.history),
            "steps": int(last.get("steps", 0)),
            **{
                k: last.get(k)
                for k in ("train_loss", "train_accuracy", "test_loss", "test_accuracy")
            },
            "temp_bytes_per_step": self.temp_bytes,
            "compile_seconds": self.compile_seconds,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.wall_seconds,
            "history": self.history,
            "step_losses": self.step_losses,
        }


def fit(config: TrainConfig | None = None, data: Dataset | None = None) -> TrainResult:
    """Train a ``moonjax.models.RevNetClassifier`` with Adam; return a ``TrainResult``.

    One train step is ``moonjax.moonwalk_value_and_grad`` (or ``jax.value_and_grad``) of
    the mean cross-entropy, then ``optax.adam``, compiled once with ``jax.jit`` and run
    data parallel over ``config.devices`` devices (``make_train_step``). Every epoch
    visits the training split in an order drawn from ``(seed, epoch)``, drops the last
    partial batch, then scores both splits; with ``config.checkpoint`` it saves the
    parameters, the optimizer state and the history, so a run restored from it continues
    exactly as an uninterrupted one would.

    Args:
      config: the run's settings (default: ``TrainConfig()``).
      data: a ``Dataset`` to use instead of loading ``config.data``.

    Example:
      >>> result = fit(TrainConfig(epochs=3, depth=2, verbose=False))
      >>> round(result.test_accuracy, 2)
      0.97
    """
    with one_blas_thread():
        return _fit(config, data)


@contextlib.contextmanager
def one_blas_thread():
    """Limit OpenBLAS to one thread inside the block, unless ``OPENBLAS_NUM_THREADS`` is set.

    Moonwalk's dense-layer vijps are small LAPACK solves, which JAX on CPU runs in
    SciPy's OpenBLAS; its spin-waiting worker threads compete with XLA's own threads, and
    one thread makes such solves many times faster. Setting ``OPENBLAS_NUM_THREADS``
    before the library loads (as the ``moonjax`` command does) is the usual way; this
    does the same at run time with ``threadpoolctl`` when it is installed (it comes with
    scikit-learn), and does nothing otherwise.
    """
    if "OPENBLAS_NUM_THREADS" in os.environ:
        yield
        return
    try:
        import scipy.linalg.cython_lapack  # noqa: F401  (loads the OpenBLAS that JAX calls)
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1, user_api="blas"):
        yield


def _fit(config: TrainConfig | None, data: Dataset | None) -> TrainResult:
    t_start = time.perf_counter()
    config = TrainConfig() if config is None else config
    if data is None:
        data = load_dataset(config.data, test_fraction=config.test_fraction)
    mesh = data_mesh(config.devices)
    ndev = mesh.size
    if config.batch_size % ndev:
        raise ConfigError(
            f"batch size {config.batch_size} must be a multiple of the number of devices "
            f"({ndev}): each device takes an equal slice of the batch"
        )
    n_train = len(data.x_train)
    steps_per_epoch = n_train // config.batch_size
    if steps_per_epoch == 0:
        raise DataError(
            f"{data.name}: the training split has {n_train} example(s), fewer than one batch "
            f"({config.batch_size}); lower --batch-size"
        )
    rep, batch = replicated(mesh), batch_sharded(mesh)
    put_params = lambda tree: jax.tree.map(lambda a: put_global(np.asarray(a), rep), tree)

    shape = data.input_shape
    meta = {
        "model": "RevNetClassifier",
        "input_shape": list(shape),
        "num_classes": data.num_classes,
        "width": config.width,
        "depth": config.depth,
        "hidden": config.hidden,
        "optimizer": "adam",
    }
    saved = None if config.checkpoint is None else _checkpoint.load(config.checkpoint, meta)
    model = RevNetClassifier(
        shape[0] if len(shape) == 1 else shape,
        data.num_classes,
        rngs=nnx.Rngs(config.seed),
        width=config.width,
        depth=config.depth,
        hidden=config.hidden,
    )
    graphdef, params = nnx.split(model)
    num_params = sum(int(np.size(a)) for a in jax.tree.leaves(params))
    optimizer = optax.adam(config.lr)
    opt_state = optimizer.init(params)
    start_epoch, step, history = 0, 0, []
    if saved is not None:
        params, opt_state, start_epoch, step, history = _checkpoint.restore(
            saved, params=params, opt_state=opt_state
        )
    params, opt_state = put_params(params), put_params(opt_state)

    out = Progress(
        config.epochs * steps_per_epoch,
        show=config.verbose,
        rich=None if config.progress else False,
    )
    evaluate = _evaluator(
        graphdef, mesh, min(max(config.batch_size, 512), max(n_train, len(data.x_test)))
    )

    def batch_at(order, i):
        ix = order[i * config.batch_size : (i + 1) * config.batch_size]
        return put_global(data.x_train[ix], batch), put_global(data.y_train[ix], batch)

    t0 = time.perf_counter()
    compiled, temp_bytes = _compiled_step(
        graphdef, optimizer, config, mesh, params, opt_state, *batch_at(np.arange(n_train), 0)
    )
    compile_seconds = time.perf_counter() - t0

    grad_name = config.grad
    plan = ""
    if config.grad == "moonwalk":
        anchors = "" if config.anchor_every is None else f", anchor_every {config.anchor_every}"
        grad_name += f" (mode {config.mode}{anchors})"
        xb, yb = batch_at(np.arange(n_train), 0)
        plan = moonjax.check(classifier_loss(graphdef), params, xb, yb, mode=config.mode,
                             anchor_every=config.anchor_every).plan
    out.print(
        f"moonjax train: RevNetClassifier, depth {config.depth}, width {model.width}, "
        f"{num_params:,} parameters; {data.name}: {n_train} train / {len(data.x_test)} "
        f"test, {shape} -> {data.num_classes} classes"
    )
    out.print(
        f"  {grad_name}, adam lr {config.lr:g}, batch {config.batch_size} over {ndev} "
        f"device(s), {steps_per_epoch} steps/epoch"
        + (f"; restored epoch {start_epoch} from {config.checkpoint}" if start_epoch else "")
    )
    if plan:
        out.print(f"  plan: {plan}")

    step_losses: list[float] = []
    train_seconds = 0.0
    prior_seconds = history[-1]["seconds"] if history else 0.0
    with out:
        out.advance(step)
        for epoch in range(start_epoch, config.epochs):
            if config.max_steps is not None and len(step_losses) >= config.max_steps:
                break
            order = np.random.default_rng([config.seed, epoch]).permutation(n_train)
            losses = []
            partial = False
            for i in range(steps_per_epoch):
                if (
                    config.max_steps is not None
                    and len(step_losses) + len(losses) >= config.max_steps
                ):
                    partial = True
                    break
                xb, yb = batch_at(order, i)
                t = time.perf_counter()
                params, opt_state, value = compiled(params, opt_state, xb, yb)
                value.block_until_ready()
                train_seconds += time.perf_counter() - t
                losses.append(value)
                step += 1
                out.advance(step, f"loss {float(to_host(value)):.4f}")
            step_losses.extend(float(to_host(v)) for v in losses)
            train_loss, train_acc = evaluate(params, data.x_train, data.y_train)
            test_loss, test_acc = evaluate(params, data.x_test, data.y_test)
            record = {
                "epoch": epoch + 1,
                "steps": step,
                "train_loss": train_loss,
                "train_accuracy": train_acc,
                "test_loss": test_loss,
                "test_accuracy": test_acc,
                "seconds": prior_seconds + train_seconds,
            }
            history.append(record)
            out.print(
                f"epoch {epoch + 1:>3}/{config.epochs}  train loss {train_loss:.4f} "
                f"acc {train_acc:7.2%}   test loss {test_loss:.4f} acc {test_acc:7.2%}"
                + ("  (partial epoch: --max-steps)" if partial else "")
            )
            if config.checkpoint is not None and not partial:
                _checkpoint.save(
                    config.checkpoint,
                    params=params,
                    opt_state=opt_state,
                    epoch=epoch + 1,
                    step=step,
                    meta=meta,
                    history=history,
                )

    result = TrainResult(
        config=config,
        graphdef=graphdef,
        params=params,
        history=history,
        step_losses=step_losses,
        start_epoch=start_epoch,
        num_params=num_params,
        devices=ndev,
        temp_bytes=temp_bytes,
        compile_seconds=compile_seconds,
        train_seconds=train_seconds,
        wall_seconds=time.perf_counter() - t_start,
    )
    for line in summary_lines(result):
        out.print(line)
    return result


# Compiled train steps of this process, so that repeated fits of the same model (a
# hyperparameter sweep, resuming from a checkpoint, tests) compile once. The key holds
# everything the program depends on; the loss closes over the graphdef only.
_STEP_CACHE: dict[Any, tuple[Any, int | None]] = {}
_STEP_CACHE_SIZE = 8


def _compiled_step(graphdef, optimizer, config: TrainConfig, mesh, params, opt_state, x, y):
    """``(compiled train step, its XLA temp bytes)``, from the cache when possible."""
    signature = lambda tree: (
        jax.tree.structure(tree),
        tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(tree)),
    )
    key = (
        graphdef,
        config.grad,
        config.mode,
        config.anchor_every,
        config.lr,
        mesh,
        signature(params),
        signature(opt_state),
        signature((x, y)),
    )
    if key not in _STEP_CACHE:
        step = make_train_step(
            classifier_loss(graphdef),
            optimizer,
            grad=config.grad,
            mode=config.mode,
            anchor_every=config.anchor_every,
            mesh=mesh,
        )
        compiled = step.lower(params, opt_state, x, y).compile()
        memory = compiled.memory_analysis()
        temp = int(memory.temp_size_in_bytes) if memory is not None else None
        while len(_STEP_CACHE) >= _STEP_CACHE_SIZE:
            _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
        _STEP_CACHE[key] = (compiled, temp)
    return _STEP_CACHE[key]


def summary_lines(result: TrainResult) -> list[str]:
    """The final summary of a run, as printed by ``moonjax train``."""
    if not result.history:
        return ["summary: no epoch recorded"]
    last = result.history[-1]
    steps_run = len(result.step_losses)
    rate = f", {steps_run / result.train_seconds:.0f} steps/s" if steps_run else ""
    memory = "n/a" if result.temp_bytes is None else format_bytes(result.temp_bytes)
    restored = (
        f" (the checkpoint already holds {len(result.history)} epochs)" if not steps_run else ""
    )
    return [
        "summary" + restored,
        f"  test accuracy      {last['test_accuracy']:.2%}  (train {last['train_accuracy']:.2%})",
        f"  test loss          {last['test_loss']:.4f}  (train {last['train_loss']:.4f})",
        f"  steps              {steps_run} this run, {int(last['steps'])} in all{rate}",
        f"  time               {result.wall_seconds:.1f} s wall, {result.train_seconds:.1f} s "
        f"in train steps, {result.compile_seconds:.1f} s compiling the step",
        f"  XLA temp memory    {memory} per train step "
        f"({result.config.grad}, batch {result.config.batch_size})",
    ]


def format_bytes(n: int) -> str:
    """``1536 -> '1.50 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError


def _evaluator(graphdef, mesh, chunk: int) -> Callable:
    """``evaluate(params, x, y) -> (mean loss, accuracy)``, in sharded chunks of one shape.

    Every chunk is padded to ``chunk`` examples (rounded up to a multiple of the devices)
    with zero weights, so one compiled program scores both splits.
    """
    ndev = mesh.size
    size = math.ceil(chunk / ndev) * ndev
    rep, batch = replicated(mesh), batch_sharded(mesh)

    def sums(params, x, y, w):
        logits = nnx.merge(graphdef, params)(x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        correct = (jnp.argmax(logits, -1) == y).astype(losses.dtype)
        return jnp.sum(w * losses), jnp.sum(w * correct)

    sums = jax.jit(sums, in_shardings=(rep, batch, batch, batch), out_shardings=rep)

    def evaluate(params, x, y):
        n = len(x)
        total_loss = total_correct = 0.0
        for start in range(0, n, size):
            xc, yc = x[start : start + size], y[start : start + size]
            w = np.ones(len(xc), np.float32)
            pad = size - len(xc)
            if pad:
                xc = np.concatenate([xc, np.zeros((pad, *xc.shape[1:]), xc.dtype)])
                yc = np.concatenate([yc, np.zeros(pad, yc.dtype)])
                w = np.concatenate([w, np.zeros(pad, np.float32)])
            loss_sum, correct = sums(
                params, put_global(xc, batch), put_global(yc, batch), put_global(w, batch)
            )
            total_loss += float(to_host(loss_sum))
            total_correct += float(to_host(correct))
        return total_loss / n, total_correct / n

    return evaluate
