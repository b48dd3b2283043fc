"""Equinox-style transforms: differentiate the inexact arrays of the first argument.

An Equinox model is a pytree that holds its weights beside functions (an
``eqx.nn.MLP``'s activation), integers and flags. ``filter_grad`` splits its first
argument into the floating-point arrays, which are differentiated, and everything else,
which is held fixed, as ``equinox.filter_grad`` does, then runs
``moonwalk_value_and_grad`` on the arrays. Equinox itself is not needed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moonjax._src.api import moonwalk_value_and_grad


def _is_inexact_array(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray)) and jnp.issubdtype(leaf.dtype,
                                                                          jnp.inexact)


class _Fixed:
    """A leaf held fixed (a function, an int, a flag): a pytree node with no children,
    so that it is part of the tree's static structure, as Equinox's filters keep it."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return hash((type(self.value), self.value))

    def __eq__(self, other):
        return (isinstance(other, _Fixed) and type(other.value) is type(self.value)
                and bool(other.value == self.value))


jax.tree_util.register_static(_Fixed)


def _partition(tree):
    """``(arrays, rest)``: two trees shaped like ``tree``, each ``None`` where the other
    has the leaf; the leaves of ``rest`` that are not arrays are ``_Fixed``."""
    arrays = jax.tree_util.tree_map(lambda x: x if _is_inexact_array(x) else None, tree)
    rest = jax.tree_util.tree_map(
        lambda x: None if _is_inexact_array(x) else x
        if isinstance(x, (jax.Array, np.ndarray)) else _Fixed(x), tree)
    return arrays, rest


def _combine(arrays, rest):
    return jax.tree_util.tree_map(
        lambda a, r: a if a is not None else r.value if isinstance(r, _Fixed) else r,
        arrays, rest, is_leaf=lambda x: x is None or isinstance(x, _Fixed))


def filter_value_and_grad(fun: Callable, *, has_aux: bool = False,
                          **options: Any) -> Callable:
    """Like ``equinox.filter_value_and_grad``, computed by ``moonwalk_value_and_grad``.

    The floating-point arrays among the leaves of the first positional argument are
    differentiated; its other leaves (functions, integers, flags, non-float arrays) are
    held fixed, and so are all other arguments. The gradient has the structure of the
    first argument with ``None`` at every leaf that was not differentiated.

    Args:
      fun: the loss, ``fun(model, *args, **kwargs)``, returning a real scalar (or
        ``(loss, aux)`` with ``has_aux``).
      has_aux: as in ``jax.value_and_grad``.
      **options: the keyword options of ``moonwalk_value_and_grad`` (``mode``,
        ``anchor_every``, ``drift_tol``, ``on_drift``, ...).

    Returns:
      A function with ``fun``'s signature returning ``(value, grads)``.

    Raises:
      moonjax.ArgumentError: an option of ``moonwalk_value_and_grad`` is invalid.

    Example:
      >>> import jax, jax.numpy as jnp, moonjax
      >>> model = {"w": jnp.eye(2), "act": jnp.tanh, "depth": 3}
      >>> def loss(model, x):
      ...     h = x
      ...     for _ in range(model["depth"]):
      ...         h = model["act"](h @ model["w"])
      ...     return jnp.sum(h ** 2)
      >>> value, grads = moonjax.filter_value_and_grad(loss)(model, jnp.ones((3, 2)))
      >>> grads["w"].shape, grads["act"], grads["depth"]
      ((2, 2), None, None)
    """
    def split_call(arrays, rest, *args, **kwargs):
        return fun(_combine(arrays, rest), *args, **kwargs)

    value_and_grad = moonwalk_value_and_grad(split_call, argnums=0, has_aux=has_aux,
                                             **options)

    @functools.wraps(fun)
    def wrapper(model, *args, **kwargs):
        arrays, rest = _partition(model)
        return value_and_grad(arrays, rest, *args, **kwargs)

    return wrapper


def filter_grad(fun: Callable, *, has_aux: bool = False, **options: Any) -> Callable:
    """Like ``equinox.filter_grad``, computed by ``moonwalk_value_and_grad``.

    See ``filter_value_and_grad`` for what is differentiated.

    Args:
      fun: the loss, ``fun(model, *args, **kwargs)``.
      has_aux: as in ``jax.grad``: the result is then ``(grads, aux)``.
      **options: the keyword options of ``moonwalk_value_and_grad``.

    Returns:
      A function with ``fun``'s signature returning the gradients (``(grads, aux)``
      with ``has_aux``).

    Raises:
      moonjax.ArgumentError: an option of ``moonwalk_value_and_grad`` is invalid.

    Example:
      >>> import jax.numpy as jnp, moonjax
      >>> model = (jnp.ones(3), "a label")
      >>> moonjax.filter_grad(lambda m, x: jnp.sum(m[0] * x))(model, jnp.arange(3.0))
      (Array([0., 1., 2.], dtype=float32), None)
    """
    value_and_grad = filter_value_and_grad(fun, has_aux=has_aux, **options)

    @functools.wraps(fun)
    def wrapper(*args, **kwargs):
        value, grads = value_and_grad(*args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapper
