"""The gradient methods the benchmark compares, one table.

A ``Method`` turns a benchmark ``Model`` into a
gradient function ``grad(params, x, y) -> grads``. The table ``METHODS`` is the
list the command line offers; adding a method is one entry. A method that cannot run
in this installation (a Moonwalk mode this version of moonjax does not have) raises
``MethodUnavailable`` from ``build`` and the benchmark reports it as skipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.flatten_util import ravel_pytree

import moonjax
from moonjax.bench._models import Model, make_loss

GradFn = Callable[..., object]


class MethodUnavailable(Exception):
    """The method cannot be built here; the message says why (shown as a note)."""


@dataclasses.dataclass(frozen=True)
class Method:
    """A way to compute ``∂loss/∂params``.

    Attributes:
      name: the name used on the command line and in the reports.
      summary: one line for the docs.
      build: ``model -> grad(params, x, y)``; may raise ``MethodUnavailable``.
      max_params: skip the method above this many parameters (its cost grows with
        the parameter count); ``None`` for no limit.
      budget_search: whether the largest depth under the memory budget is searched
        for this method (not for methods whose limit is time, not memory).
      max_features: skip the method when one example's input has more entries than
        this (its cost grows with them); ``None`` for no limit.
      cost: what its time grows with, said when a limit skips it.
    """

    name: str
    summary: str
    build: Callable[[Model], GradFn]
    max_params: int | None = None
    max_features: int | None = None
    budget_search: bool = True
    cost: str = "one pass per parameter"


def _backprop(model: Model) -> GradFn:
    return jax.grad(make_loss(model, "plain"))


def _remat(model: Model) -> GradFn:
    return jax.grad(make_loss(model, "remat"))


def _revbackprop(model: Model) -> GradFn:
    if model.inverse is None:
        raise MethodUnavailable(f"{model.name} has no inverse")
    return jax.grad(make_loss(model, "reversible"))


def naive_forward_grad(loss: Callable) -> GradFn:
    """Forward-mode gradient with one ``jax.jvp`` per parameter scalar.

    ``∂ℓ/∂θ_k = jvp(ℓ, θ, e_k)``: ``P`` forward passes for ``P`` parameters, run one at
    a time by ``lax.map``. With ``P ∝ depth`` and each pass ``∝ depth``, time is
    quadratic in depth — the cost Moonwalk avoids.
    """

    def grad(params, *args):
        flat, unravel = ravel_pytree(params)

        def one(k):
            tangent = jnp.zeros_like(flat).at[k].set(1)
            return jax.jvp(lambda f: loss(unravel(f), *args), (flat,), (tangent,))[1]

        return unravel(lax.map(one, jnp.arange(flat.size)))

    return grad


def _naive_forward(model: Model) -> GradFn:
    return naive_forward_grad(make_loss(model, "plain"))


def _moonwalk(mode: str, **options) -> Callable[[Model], GradFn]:
    def build(model: Model) -> GradFn:
        try:
            return moonjax.moonwalk_grad(make_loss(model, "plain"), mode=mode, **options)
        except (ValueError, moonjax.ArgumentError) as e:
            raise MethodUnavailable(
                f"moonjax {moonjax.__version__} has no mode={mode!r} ({e})"
            ) from None

    return build


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("backprop", "jax.grad: reverse mode, every layer's residuals stored", _backprop),
        Method(
            "remat",
            "jax.grad with jax.checkpoint on the scan body: stores one "
            "activation per layer, recomputes the rest",
            _remat,
        ),
        Method(
            "revbackprop",
            "reversible backprop: a custom_vjp whose backward pass "
            "rebuilds each layer's input by inverting the layer",
            _revbackprop,
        ),
        Method(
            "naive_forward",
            "forward gradients: one jax.jvp per parameter scalar (quadratic in depth)",
            _naive_forward,
            max_params=5000,
            budget_search=False,
        ),
        Method(
            "moonwalk",
            "moonjax.moonwalk_grad(loss): the default, the plan's choice per program "
            "(reversible backprop for additive couplings, Moonwalk otherwise)",
            _moonwalk("auto"),
        ),
        Method(
            "moonwalk_mixed",
            "moonjax.moonwalk_grad(mode='mixed'): reverse pass for "
            "the input cotangent, then the inverse-forward sweep",
            _moonwalk("mixed"),
        ),
        Method(
            "moonwalk_forward",
            "moonjax.moonwalk_grad(mode='forward', batch_axis=0): forward-mode input "
            "cotangent (one JVP per input feature), then the sweep; narrow inputs only",
            _moonwalk("forward", batch_axis=0),
            max_features=128,
            cost="one JVP per input feature",
        ),
        Method(
            "moonwalk_reversible",
            "moonjax.moonwalk_grad(mode='reversible'): reversible backprop derived "
            "from the program (each layer inverted and differentiated on the way back)",
            _moonwalk("reversible"),
        ),
    )
}

BASELINE = "backprop"
