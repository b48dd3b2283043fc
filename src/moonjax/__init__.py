"""moonjax: Moonwalk (inverse-forward differentiation) for JAX.

Exact gradients without storing activations: ``moonwalk_grad`` is used exactly where
``jax.grad`` would be.
"""

from moonjax._src.api import (
    custom_vijp,
    moonwalk_grad,
    moonwalk_value_and_grad,
    vijp,
)
from moonjax._src.check import CheckReport, check
from moonjax._src.errors import (
    ArgumentError,
    DriftError,
    LossShapeError,
    MoonjaxError,
    NonFiniteCotangentError,
    NotPermutationError,
    NotSubmersiveError,
    SpineStructureError,
    UnsupportedPrimitiveError,
    from_runtime_error,
)
from moonjax._src.fidelity import FidelityReport, fidelity
from moonjax._src.filtered import filter_grad, filter_value_and_grad
from moonjax._src.rules import register_vijp

__version__ = "0.1.0"

__all__ = [
    "ArgumentError",
    "CheckReport",
    "DriftError",
    "FidelityReport",
    "LossShapeError",
    "MoonjaxError",
    "NonFiniteCotangentError",
    "NotPermutationError",
    "NotSubmersiveError",
    "SpineStructureError",
    "UnsupportedPrimitiveError",
    "check",
    "custom_vijp",
    "fidelity",
    "filter_grad",
    "filter_value_and_grad",
    "from_runtime_error",
    "moonwalk_grad",
    "moonwalk_value_and_grad",
    "register_vijp",
    "vijp",
]
