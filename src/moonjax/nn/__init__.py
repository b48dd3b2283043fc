"""Invertible Flax NNX modules for Moonwalk.

Every layer maps ``x -> y`` with ``__call__`` and back with ``inverse``; flow layers also
give ``log_det`` / ``forward_and_log_det``. All parameters are ``nnx.Param``, so the
standard pattern works with ``jax.grad``, ``moonjax.moonwalk_grad`` and optax::

    graphdef, params = nnx.split(model)

    def loss(params, x, y):
        model = nnx.merge(graphdef, params)
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()
"""

from moonjax.nn._activation import LeakyReLU
from moonjax.nn._base import Invertible, initialize
from moonjax.nn._coupling import AdditiveCoupling, AffineCoupling, RevBlock
from moonjax.nn._errors import ConfigError, ShapeError
from moonjax.nn._linear import InvertibleConv1x1, InvertibleDense
from moonjax.nn._norm import ActNorm
from moonjax.nn._shape import ChannelShuffle, Reverse, Squeeze
from moonjax.nn._side import MLP, ConvNet
from moonjax.nn._stack import Sequential, Stack

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "ChannelShuffle",
    "ConfigError",
    "ConvNet",
    "Invertible",
    "InvertibleConv1x1",
    "InvertibleDense",
    "LeakyReLU",
    "MLP",
    "RevBlock",
    "Reverse",
    "Sequential",
    "ShapeError",
    "Squeeze",
    "Stack",
    "initialize",
]
