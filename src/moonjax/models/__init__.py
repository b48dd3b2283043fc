"""Reference models built from ``moonjax.nn``: a RevNet classifier, a Glow flow and a
reversible transformer, with loss helpers in the ``loss(params, x, ...)`` form that
``jax.grad`` and ``moonjax.moonwalk_grad`` take."""

from moonjax.models._glow import GlowFlow, flow_loss
from moonjax.models._revnet import RevNetClassifier, classifier_loss
from moonjax.models._transformer import (
    ReversibleTransformer,
    ReversibleTransformerBlock,
    SelfAttention,
)

__all__ = [
    "GlowFlow",
    "RevNetClassifier",
    "ReversibleTransformer",
    "ReversibleTransformerBlock",
    "SelfAttention",
    "classifier_loss",
    "flow_loss",
]
