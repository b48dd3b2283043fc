"""Elementwise primitives: which keep an elementwise map injective.

The sweep inverts a connected region of elementwise primitives as a whole (see
``moonjax._src.sweep``), so an entry here is only a check: given which operands
depend on the region's spine input, does the primitive keep the map one-to-one?
``None`` means yes; a string says why not.
"""

from __future__ import annotations

from jax import lax

from moonjax._src.rules import elementwise_rules


def monotone(node, flags):
    """Strictly monotone in its one operand (exp, tanh, …)."""
    return None


def mask(node, flags):
    """Comparisons: their boolean outputs carry no cotangent."""
    return None


def shift(node, flags):
    """``add``/``sub``: injective whatever the other operand."""
    return None


def scale(node, flags):
    """``mul``/``div`` by a value that does not depend on the spine input."""
    if all(flags):
        return (
            f"`{node.primitive.name}` of two values that both depend on the spine input "
            "is not one-to-one in general (e.g. x*x, x*sigmoid(x))"
        )
    return None


def piecewise(node, flags):
    """``max``/``min``/``select_n``: every branch must depend on the spine input."""
    cases = flags[1:] if node.primitive is lax.select_n_p else flags
    if not all(cases):
        return (
            f"`{node.primitive.name}` selects a branch that does not depend on the spine "
            "input (a ReLU-like clamp): the map is flat there, so its Jacobian has a cokernel"
        )
    return None


def not_injective(node, flags):
    return f"`{node.primitive.name}` is not one-to-one"


def odd_power(node, flags):
    if node.params["y"] % 2 == 0:
        return f"`integer_pow` with even exponent {node.params['y']} is not one-to-one"
    return None


def float_convert(node, flags):
    aval = node.outputs[0].aval
    if not _is_float(aval.dtype):
        return "`convert_element_type` to a non-float type has no cotangent"
    return None


def _is_float(dtype) -> bool:
    import jax.numpy as jnp

    return jnp.issubdtype(dtype, jnp.floating)


_FAMILIES = {
    monotone: [
        lax.exp_p, lax.log_p, lax.tanh_p, lax.logistic_p, lax.sinh_p, lax.asinh_p,
        lax.atan_p, lax.atanh_p, lax.log1p_p, lax.expm1_p, lax.erf_p, lax.erf_inv_p,
        lax.neg_p, lax.cbrt_p, lax.sqrt_p, lax.rsqrt_p, lax.copy_p, lax.reduce_precision_p,
        lax.exp2_p, lax.tan_p, lax.erfc_p,
    ],
    mask: [lax.ge_p, lax.gt_p, lax.le_p, lax.lt_p, lax.eq_p, lax.ne_p, lax.is_finite_p],
    shift: [lax.add_p, lax.sub_p],
    scale: [lax.mul_p, lax.div_p, lax.pow_p],
    piecewise: [lax.max_p, lax.min_p, lax.select_n_p],
    not_injective: [
        lax.abs_p, lax.sign_p, lax.floor_p, lax.ceil_p, lax.round_p, lax.sin_p, lax.cos_p,
        lax.square_p, lax.stop_gradient_p if hasattr(lax, "stop_gradient_p") else None,
        lax.rem_p, lax.clamp_p, lax.cosh_p,
    ],
    odd_power: [lax.integer_pow_p],
    float_convert: [lax.convert_element_type_p],
}

for _check, _prims in _FAMILIES.items():
    for _p in _prims:
        if _p is not None:
            elementwise_rules[_p] = _check
