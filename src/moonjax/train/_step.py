"""The train step: gradients (Moonwalk or backprop), an optax update, data-parallel sharding."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import moonjax
from moonjax._src.api import MODES as _MODES
from moonjax.nn import ConfigError

GRADS = ("moonwalk", "backprop")
MODES = _MODES  # moonwalk_grad's treatments
BATCH_AXIS = "batch"


def data_mesh(devices: int | Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis ``jax.sharding.Mesh`` named ``"batch"`` for data parallelism.

    Args:
      devices: ``None`` for every device (all hosts' under ``jax.distributed``), a count
        ``n`` for the first ``n`` of ``jax.devices()``, or the devices themselves.

    Example:
      >>> mesh = data_mesh()               # every device
      >>> mesh.axis_names
      ('batch',)
    """
    available = jax.devices()
    if devices is None:
        chosen = available
    elif isinstance(devices, int):
        if not 1 <= devices <= len(available):
            raise ConfigError(
                f"asked for {devices} device(s); there are {len(available)} "
                f"({available[0].platform}). On CPU, more can be simulated with "
                "XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts"
            )
        chosen = available[:devices]
    else:
        chosen = list(devices)
    return Mesh(np.array(chosen), (BATCH_AXIS,))


def make_train_step(
    loss: Callable,
    optimizer: optax.GradientTransformation,
    *,
    grad: str = "moonwalk",
    mode: str = "auto",
    anchor_every: int | str | None = "auto",
    mesh: Mesh | None = None,
    donate: bool = False,
) -> Callable:
    """A jitted, data-parallel train step: ``(params, opt_state, x, y) -> (..., loss)``.

    The gradient of ``loss(params, x, y)`` is ``moonjax.moonwalk_value_and_grad(loss,
    mode=mode)`` (``x`` is the stream swept forwards) or ``jax.value_and_grad(loss)``;
    the optimizer then applies it and the step returns ``(params, opt_state, loss)``.
    With a ``mesh`` (see ``data_mesh``) the step is compiled with
    ``in_shardings``/``out_shardings``: ``x`` and ``y`` are split along their leading
    (batch) axis over the mesh's devices, parameters and optimizer state are replicated.
    XLA's SPMD partitioner inserts the cross-device reductions of the mean loss and the
    gradients; there are no hand-written collectives, and the result equals the
    single-device step up to float rounding.

    Args:
      loss: ``loss(params, x, y) -> scalar``, e.g.
        ``moonjax.models.classifier_loss``.
      optimizer: an optax transformation, e.g. ``optax.adam(1e-3)``.
      grad: ``"moonwalk"`` or ``"backprop"``.
      mode: passed to ``moonjax.moonwalk_grad`` (``grad="moonwalk"``; ``"auto"``);
        ``"forward"`` runs with ``batch_axis=0`` (examples are independent).
      anchor_every: passed to ``moonjax.moonwalk_grad`` (``grad="moonwalk"``): record
        an exact cotangent every ``k`` layers (or ``"auto"``) so float32 rounding cannot
        grow through deep stacks.
      mesh: a mesh with a ``"batch"`` axis; ``None`` compiles for the default device.
      donate: let XLA reuse the buffers of ``params`` and ``opt_state`` for the outputs
        (the inputs are invalid after the call).

    Returns:
      The jitted step; ``step.lower(...).compile().memory_analysis()`` gives its XLA
      memory.

    Example:
      >>> from flax import nnx
      >>> from moonjax.models import RevNetClassifier, classifier_loss
      >>> graphdef, params = nnx.split(RevNetClassifier(16, 4, rngs=nnx.Rngs(0)))
      >>> optimizer = optax.adam(1e-3)
      >>> opt_state = optimizer.init(params)
      >>> step = make_train_step(classifier_loss(graphdef), optimizer, mesh=data_mesh())
      >>> x, y = np.ones((8, 16), np.float32), np.arange(8) % 4
      >>> params, opt_state, value = step(params, opt_state, x, y)
      >>> value.shape
      ()
    """
    if grad not in GRADS:
        raise ConfigError(f"grad must be one of {GRADS}; got {grad!r}")
    if grad == "moonwalk":
        # examples are independent along the batch axis, as data parallelism assumes:
        # forward mode then needs one JVP per feature, not one per input entry
        value_and_grad = moonjax.moonwalk_value_and_grad(
            loss, mode=mode, anchor_every=anchor_every,
            batch_axis=0 if mode == "forward" else None)
    else:
        value_and_grad = jax.value_and_grad(loss)

    def step(params, opt_state, x, y):
        value, grads = value_and_grad(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    donate_argnums = (0, 1) if donate else ()
    if mesh is None:
        return jax.jit(step, donate_argnums=donate_argnums)
    rep, batch = replicated(mesh), batch_sharded(mesh)
    return jax.jit(
        step,
        in_shardings=(rep, rep, batch, batch),
        out_shardings=(rep, rep, rep),
        donate_argnums=donate_argnums,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """The leading (batch) axis is split over the mesh's ``"batch"`` axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def put_global(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global ``jax.Array`` from a host array every process holds in full.

    Each process fills only its own devices' shards (``make_array_from_callback``), so
    the same code runs on one host and on many under ``jax.distributed``.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(x: jax.Array) -> np.ndarray:
    """A replicated array's value on this host (works for multi-host arrays too)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(x.addressable_data(0))
    return np.asarray(x)
