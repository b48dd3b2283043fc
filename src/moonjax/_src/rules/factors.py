"""Weights the sweep solves with: the factors the program builds them from, or one LU.

The sweep crosses a dense layer ``y = x W`` by solving ``g_y Wᵀ = g_x``. For a general
square ``W`` that is a pivoted LU factorisation (``O(n³)``) and two triangular solves.
Many invertible layers hold ``W`` factorised already: ``moonjax.nn.InvertibleDense`` and
Glow's 1x1 convolution compute ``W = P L U`` from a constant permutation ``P``, a unit
lower-triangular ``L = tril(A, -1) + I`` and an upper-triangular
``U = triu(B, 1) + diag(exp(s))``. Solving with those factors needs no factorisation:

.. math::

   g_y = g_x W^{-T} = g_x P^{-T} L^{-T} U^{-T}

(a permutation of the columns, then two triangular solves).

The criterion is read from the program, not from layer names. ``W`` is a product
(``dot_general`` of square matrices, ``transpose``) of *factors*, each of which is

* triangular or diagonal: its zero pattern, derived statically from the equations that
  build it, lies on one side of the diagonal. A pattern is a band of diagonals
  ``lo <= j - i <= hi`` outside which the matrix is exactly zero: comparisons of ``iota``
  give masks (``jnp.tril``/``jnp.triu``, ``jnp.eye``), ``select_n`` by such a mask keeps
  a band, ``mul`` intersects bands, ``add`` joins them and a matrix product adds them;
* a monomial matrix (exactly one nonzero per row and column: a permutation, possibly
  scaled) that is a constant of the program (its value is known when it is traced).

and ``W`` is a float32 or float64 matrix whose products are computed at its precision
(a 16-bit ``W`` is solved in float32, where its own rounding matters: as computed).

``W`` is invertible exactly when every factor is, so the solve is exact wherever the
LU one is. A weight that is not such a product (a free matrix) is factorised with a
pivoted LU once per call, however many steps solve with it (a weight shared by several
layers), and the factorisation is dropped after the last of them. (A weight that a
``scan`` reads as a constant is factorised in the swept loop body; XLA hoists that out of
the loop, so it too is factorised once per call.)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.lax.linalg import triangular_solve

from moonjax._src import graph as G
from moonjax._src.rules import ct_dtype

INF = math.inf


@dataclasses.dataclass(frozen=True)
class Band:
    """The diagonals ``lo <= j - i <= hi`` of a matrix: where it may be nonzero (a zero
    pattern), or where a boolean mask is true (then exactly)."""

    lo: float
    hi: float

    @property
    def empty(self) -> bool:
        return self.lo > self.hi or self.lo == INF or self.hi == -INF

    def __and__(self, other: Band) -> Band:
        return Band(max(self.lo, other.lo), min(self.hi, other.hi))

    def __or__(self, other: Band) -> Band:  # the smallest band holding both
        if self.empty:
            return other
        if other.empty:
            return self
        return Band(min(self.lo, other.lo), max(self.hi, other.hi))

    def __add__(self, other: Band) -> Band:  # the band of a matrix product
        if self.empty or other.empty:
            return EMPTY
        return Band(self.lo + other.lo, self.hi + other.hi)

    @property
    def T(self) -> Band:  # noqa: N802 - the transpose, as for arrays
        return EMPTY if self.empty else Band(-self.hi, -self.lo)

    def complement(self) -> Band | None:
        """The diagonals outside the band, where that is one band (else ``None``)."""
        if self.empty:
            return FULL
        if self.lo == -INF and self.hi == INF:
            return EMPTY
        if self.lo == -INF:
            return Band(self.hi + 1, INF)
        if self.hi == INF:
            return Band(-INF, self.lo - 1)
        return None


FULL = Band(-INF, INF)
EMPTY = Band(1, 0)


def _band_of(array: np.ndarray) -> Band:
    """The band of a concrete 2-D array's nonzero entries."""
    i, j = np.nonzero(array)
    if i.size == 0:
        return EMPTY
    k = j - i
    return Band(int(k.min()), int(k.max()))


@dataclasses.dataclass(frozen=True)
class Factor:
    """One square factor of a weight.

    ``kind`` is ``"lower"``, ``"upper"`` or ``"diagonal"`` (solved with the factor's
    value, read from ``value`` when the sweep runs) or ``"monomial"`` (a constant
    matrix with one nonzero per row and column: ``rows[j]`` holds the row of column
    ``j``'s nonzero and ``scale[j]`` its value). ``transposed``: the factor enters the
    product as ``valueᵀ``.
    """

    kind: str
    value: object  # G.Value | G.Lit
    transposed: bool = False
    rows: np.ndarray | None = None
    scale: np.ndarray | None = None

    @property
    def T(self) -> Factor:  # noqa: N802
        return dataclasses.replace(self, transposed=not self.transposed)


def _transposed(chain: list[Factor]) -> list[Factor]:
    """``(F₁ ⋯ F_k)ᵀ = F_kᵀ ⋯ F₁ᵀ``."""
    return [f.T for f in reversed(chain)]


# -- the static analysis ----------------------------------------------------------------


class _Patterns:
    """Zero patterns and masks of the values of a graph, derived from its equations.

    ``concrete(a)`` returns the value of an operand known when the program is traced
    (a literal, a constant of the program) as a NumPy array, else ``None``.
    """

    def __init__(self, concrete: Callable):
        self.concrete = concrete
        self.memo: dict[tuple, object] = {}

    def _cached(self, what, a, compute):
        key = (what, id(a))
        if key not in self.memo:
            self.memo[key] = compute(a)
        return self.memo[key]

    # integer values affine in their indices: x[i₀, i₁, …] = Σ c_d i_d + c, held as the
    # tuple (c₀, c₁, …, c); axes of size 1 get c_d = 0, so size-1 broadcasting is exact
    def affine(self, a) -> tuple | None:
        return self._cached("affine", a, self._affine)

    def _affine(self, a):
        if not jnp.issubdtype(a.aval.dtype, jnp.integer):
            return None
        shape = a.aval.shape
        c = self.concrete(a)
        if c is not None:
            if c.size == 0 or not np.all(c == c.flat[0]):
                return None
            return (0,) * len(shape) + (int(c.flat[0]),)
        node = a.producer if isinstance(a, G.Value) else None
        if node is None:
            return None
        name = node.primitive.name
        if name == "iota":
            d = node.params["dimension"]
            return tuple(int(k == d and shape[k] > 1) for k in range(len(shape))) + (0,)
        if name in ("add", "sub", "mul"):
            x, y = (self.affine(b) for b in node.inputs)
            if x is None or y is None:
                return None
            x, y = (f if len(f) == len(shape) + 1 else (0,) * len(shape) + f[-1:]
                    for f in (x, y))  # a scalar operand
            if name == "mul":
                if not any(x[:-1]):
                    return tuple(x[-1] * q for q in y)
                if not any(y[:-1]):
                    return tuple(y[-1] * q for q in x)
                return None
            sign = 1 if name == "add" else -1
            return tuple(q + sign * r for q, r in zip(x, y))
        if name == "neg":
            x = self.affine(node.inputs[0])
            return None if x is None else tuple(-q for q in x)
        if name == "broadcast_in_dim":
            x = self.affine(node.inputs[0])
            if x is None:
                return None
            out = [0] * len(shape)
            for q, d in zip(x[:-1], node.params["broadcast_dimensions"]):
                out[d] = q
            return tuple(out) + x[-1:]
        if name == "reshape":  # only unit axes added or removed
            x, op = self.affine(node.inputs[0]), node.inputs[0].aval.shape
            if x is None or [n for n in op if n > 1] != [n for n in shape if n > 1]:
                return None
            coeffs = iter(q for q, n in zip(x[:-1], op) if n > 1)
            return tuple(next(coeffs) if n > 1 else 0 for n in shape) + x[-1:]
        if name == "convert_element_type":
            return self.affine(node.inputs[0])
        return None

    # boolean masks that are true on a band of diagonals exactly
    def mask(self, a) -> Band | None:
        return self._cached("mask", a, self._mask)

    def _mask(self, a):
        if a.aval.dtype != jnp.bool_:
            return None
        c = self.concrete(a)
        if c is not None:
            if c.ndim == 0:
                return FULL if bool(c) else EMPTY
            if c.ndim != 2:
                return None
            band = _band_of(c)
            n, m = c.shape
            k = np.arange(m)[None, :] - np.arange(n)[:, None]
            exact = (k >= band.lo) & (k <= band.hi)
            return band if np.array_equal(exact, c) else None
        node = a.producer if isinstance(a, G.Value) else None
        if node is None:
            return None
        name = node.primitive.name
        if name in ("ge", "gt", "le", "lt", "eq") and a.aval.ndim == 2:
            x, y = (self.affine(b) for b in node.inputs)
            if x is None or y is None:
                return None
            x, y = (f if len(f) == 3 else (0, 0) + f[-1:] for f in (x, y))
            ci, cj, c0 = (q - r for q, r in zip(x, y))  # d = x - y
            if ci != -cj:
                return None  # not a function of j - i alone
            return _compare(name, cj, c0)
        if name == "and":
            x, y = (self.mask(b) for b in node.inputs)
            return None if x is None or y is None else x & y
        if name == "or":
            x, y = (self.mask(b) for b in node.inputs)
            if x is None or y is None:
                return None
            # a union is one band when the two overlap or touch
            if x.empty or y.empty or max(x.lo, y.lo) <= min(x.hi, y.hi) + 1:
                return x | y
            return None
        if name == "not":
            x = self.mask(node.inputs[0])
            return None if x is None else x.complement()
        if name == "broadcast_in_dim" and node.inputs[0].aval.ndim == 0:
            return self.mask(node.inputs[0])
        return None

    # float values: the band outside which they are exactly zero
    def nonzero(self, a) -> Band:
        return self._cached("nonzero", a, self._nonzero)

    def nonzero_as(self, a, shape) -> Band:
        """The band of operand ``a`` of an elementwise step with output ``shape``: a
        band of diagonals holds only for ``a`` at that shape (not for one broadcast
        along a size-1 axis), else only 'all zero' or 'anything' is known."""
        band = self.nonzero(a)
        if a.aval.shape == tuple(shape) or band.empty:
            return band
        return FULL

    def _nonzero(self, a):
        c = self.concrete(a)
        if c is not None:
            if c.ndim == 0:
                return EMPTY if c == 0 else FULL
            return _band_of(c) if c.ndim == 2 else (EMPTY if not c.any() else FULL)
        node = a.producer if isinstance(a, G.Value) else None
        if node is None:
            return FULL
        rule = _NONZERO.get(node.primitive.name)
        band = FULL if rule is None else rule(self, node)
        return band if band.empty or a.aval.ndim == 2 else FULL


def _compare(name: str, cj: int, c0: int) -> Band:
    """The diagonals ``k = j - i`` where ``cj * k + c0 <name> 0`` holds (integers)."""
    if name == "eq":
        if cj == 0:
            return FULL if c0 == 0 else EMPTY
        return Band(-c0 // cj, -c0 // cj) if c0 % cj == 0 else EMPTY
    if name in ("le", "lt"):  # d <= 0  <=>  -d >= 0
        cj, c0, name = -cj, -c0, "ge" if name == "le" else "gt"
    threshold = -c0 + (1 if name == "gt" else 0)  # cj * k >= threshold
    if cj == 0:
        return FULL if threshold <= 0 else EMPTY
    if cj > 0:
        return Band(-(-threshold // cj), INF)  # k >= ceil(threshold / cj)
    return Band(-INF, threshold // cj)  # k <= floor(threshold / cj) (cj < 0)


def _out_shape(node):
    return node.outputs[0].aval.shape


def _same(p: _Patterns, node) -> Band:
    return p.nonzero_as(node.inputs[0], _out_shape(node))


def _integer_pow(p: _Patterns, node) -> Band:
    return _same(p, node) if node.params["y"] > 0 else FULL  # x**0 == 1


def _join(p: _Patterns, node, operands=None) -> Band:
    out = EMPTY
    for a in node.inputs if operands is None else operands:
        out = out | p.nonzero_as(a, _out_shape(node))
    return out


def _meet(p: _Patterns, node) -> Band:
    out = FULL
    for a in node.inputs:
        out = out & p.nonzero_as(a, _out_shape(node))
    return out


def _divide(p: _Patterns, node) -> Band:
    d = p.concrete(node.inputs[1])
    if d is not None and d.ndim == 0 and d != 0:
        return _same(p, node)
    return FULL  # 0 / 0 is not zero


def _convert(p: _Patterns, node) -> Band:
    a = node.inputs[0]
    if a.aval.dtype == jnp.bool_:
        m = p.mask(a)
        return FULL if m is None else m
    if jnp.issubdtype(a.aval.dtype, jnp.inexact):
        return _same(p, node)
    return FULL


def _select(p: _Patterns, node) -> Band:
    pred, *cases = node.inputs
    m = None
    if len(cases) == 2 and pred.aval.shape in ((), _out_shape(node)):
        m = p.mask(pred)
    if m is None:
        return _join(p, node, cases)
    off, on = (p.nonzero_as(c, _out_shape(node)) for c in cases)  # on: where pred holds
    if m.empty:
        return off
    out = on & m
    if m.lo > -INF:
        out = out | (off & Band(-INF, m.lo - 1))
    if m.hi < INF:
        out = out | (off & Band(m.hi + 1, INF))
    return out


def _broadcast(p: _Patterns, node) -> Band:
    return _same(p, node)


def _transpose(p: _Patterns, node) -> Band:
    band = p.nonzero(node.inputs[0])
    return band.T if tuple(node.params["permutation"]) == (1, 0) else band


def _matmul_operands(node):
    """``(A, transpose A, B, transpose B)`` if the ``dot_general`` is a plain product
    ``op(A) @ op(B)`` of two matrices, else ``None``."""
    (lc, rc), (lb, rb) = node.params["dimension_numbers"]
    a, b = node.inputs
    if lb or rb or a.aval.ndim != 2 or b.aval.ndim != 2 or len(lc) != 1 or len(rc) != 1:
        return None
    return a, tuple(lc) == (0,), b, tuple(rc) == (1,)


def _product(p: _Patterns, node) -> Band:
    ops = _matmul_operands(node)
    if ops is None:
        return FULL
    a, ta, b, tb = ops
    band_a, band_b = p.nonzero(a), p.nonzero(b)
    return (band_a.T if ta else band_a) + (band_b.T if tb else band_b)


# primitive name -> how the zero pattern of its output follows from its operands'
_NONZERO: dict[str, Callable] = {
    "neg": _same,
    "copy": _same,
    "reduce_precision": _same,
    "integer_pow": _integer_pow,
    "add": _join,
    "add_any": _join,
    "sub": _join,
    "max": _join,
    "min": _join,
    "mul": _meet,
    "div": _divide,
    "convert_element_type": _convert,
    "select_n": _select,
    "broadcast_in_dim": _broadcast,
    "transpose": _transpose,
    "dot_general": _product,
}


def _monomial(c: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(rows, scale)`` if the square matrix ``c`` has one nonzero per row and column."""
    nz = c != 0
    if not (np.all(nz.sum(axis=0) == 1) and np.all(nz.sum(axis=1) == 1)):
        return None
    rows = np.argmax(nz, axis=0)
    return rows, c[rows, np.arange(c.shape[1])]


def _leaf(p: _Patterns, a) -> Factor | None:
    """``a`` as one factor (triangular, diagonal, constant monomial), if it is one."""
    c = p.concrete(a)
    if c is not None:
        found = _monomial(c)
        if found is not None:
            return Factor("monomial", a, rows=found[0], scale=found[1])
    band = p.nonzero(a)
    if band.empty:
        return None  # the zero matrix: singular, leave it to the general solve
    if band.lo >= 0 and band.hi <= 0:
        return Factor("diagonal", a)
    if band.hi <= 0:
        return Factor("lower", a)
    if band.lo >= 0:
        return Factor("upper", a)
    return None


def _chain(p: _Patterns, a, n: int, itemsize: int) -> list[Factor] | None:
    """``a``'s factors; products below it are computed at ``itemsize`` bytes or more
    (so the factors describe the weight to its own precision)."""
    if a.aval.shape != (n, n):
        return None
    leaf = _leaf(p, a)
    if leaf is not None:
        return [leaf]
    node = a.producer if isinstance(a, G.Value) else None
    if node is None or jnp.dtype(a.aval.dtype).itemsize < itemsize:
        return None  # a product rounded to fewer digits than the weight's
    name = node.primitive.name
    if name == "dot_general":
        ops = _matmul_operands(node)
        if ops is None:
            return None
        x, tx, y, ty = ops
        cx, cy = _chain(p, x, n, itemsize), _chain(p, y, n, itemsize)
        if cx is None or cy is None:
            return None
        return (_transposed(cx) if tx else cx) + (_transposed(cy) if ty else cy)
    if name == "transpose" and tuple(node.params["permutation"]) == (1, 0):
        c = _chain(p, node.inputs[0], n, itemsize)
        return None if c is None else _transposed(c)
    if name == "convert_element_type" and _widens(node.inputs[0].aval.dtype, a.aval.dtype):
        return _chain(p, node.inputs[0], n, itemsize)
    return None


def _widens(src, dst) -> bool:
    """Whether converting float ``src`` to ``dst`` is exact (the same or a wider float)."""
    src, dst = jnp.dtype(src), jnp.dtype(dst)
    if not (jnp.issubdtype(src, jnp.floating) and jnp.issubdtype(dst, jnp.floating)):
        return False
    return src == dst or (dst.itemsize > src.itemsize and jnp.finfo(dst).nmant
                          >= jnp.finfo(src).nmant and jnp.finfo(dst).maxexp
                          >= jnp.finfo(src).maxexp)


def weight_factors(weight, concrete: Callable) -> list[Factor] | None:
    """The factors ``[F₁, …, F_k]`` with ``weight = F₁ ⋯ F_k`` (each triangular,
    diagonal or a constant monomial matrix; see the module docstring), or ``None`` when
    the program does not build ``weight`` that way (then it is solved by an LU).

    ``weight`` is a square matrix of the graph; ``concrete(operand)`` returns the NumPy
    value of an operand that is a constant of the program, else ``None``. A 16-bit
    weight is not split: the sweep solves in float32 (``ct_dtype``), where the rounding
    of the 16-bit product ``P L U`` is a change of the weight, and solves with it as
    computed; so is a weight whose factors are multiplied at a lower precision.
    """
    shape, dtype = weight.aval.shape, jnp.dtype(weight.aval.dtype)
    if len(shape) != 2 or shape[0] != shape[1] or ct_dtype(dtype) != dtype:
        return None
    return _chain(_Patterns(concrete), weight, shape[0], dtype.itemsize)


# -- the solves -------------------------------------------------------------------------


def _solve_factor(f: Factor, value, b, *, transpose: bool):
    """``b op(F)⁻¹`` for one factor, ``op(F) = F`` or ``Fᵀ`` (``transpose`` xor the
    factor's own ``transposed``)."""
    t = transpose != f.transposed
    if f.kind == "monomial":  # F[rows[j], j] = scale[j], zero elsewhere
        unit = bool(np.all(f.scale == 1))
        if t:  # x Fᵀ = b: x[:, j] = b[:, rows[j]] / scale[j]
            x = b[:, f.rows]
            return x if unit else x / jnp.asarray(f.scale, b.dtype)
        # x F = b: x[:, rows[j]] = b[:, j] / scale[j]
        x = b if unit else b / jnp.asarray(f.scale, b.dtype)
        return x[:, np.argsort(f.rows)]
    f_val = value.astype(b.dtype)
    if f.kind == "diagonal":
        return b / jnp.diagonal(f_val)
    return triangular_solve(f_val, b, left_side=False, lower=f.kind == "lower",
                            transpose_a=t)


class Weight:
    """A weight operand of a step whose vijp solves with it (``VijpRule.solves``).

    The sweep hands it to the rule in place of the array: ``value`` is the array;
    ``solve`` and ``qr`` solve with it through its factors (``weight_factors``) where the
    program builds it from them, else through one factorisation per weight, kept in
    ``cache`` (shared by every step that solves with the same weight in one sweep).

    Args:
      value: the weight array.
      factors: ``[(Factor, value)]`` with ``value`` the factor's array (``None`` for a
        constant monomial), or ``None``.
      cache: a dict for this weight's factorisations (the sweep's, per weight).
    """

    def __init__(self, value, factors: list | None = None, cache: dict | None = None):
        self.value = value
        self.factors = factors
        self.cache = {} if cache is None else cache

    def matrix(self, axes, shape, dtype):
        """The weight with its axes permuted to ``axes`` and reshaped to ``shape``."""
        return jnp.transpose(self.value, axes).reshape(shape).astype(dtype)

    def lu(self, axes, n: int, dtype):
        """The pivoted LU of ``matrix(axes, (n, n))``, once per weight, axes and dtype."""
        key = ("lu", tuple(axes), jnp.dtype(dtype))
        if key not in self.cache:
            self.cache[key] = lax.linalg.lu(self.matrix(axes, (n, n), dtype))
        return self.cache[key]

    def qr(self, axes, shape, dtype):
        """The reduced QR of ``matrix(axes, shape)`` (tall), once per weight."""
        key = ("qr", tuple(axes), jnp.dtype(dtype))
        if key not in self.cache:
            self.cache[key] = jnp.linalg.qr(self.matrix(axes, shape, dtype))
        return self.cache[key]

    def solve(self, b, axes, *, transpose: bool):
        """``b M⁻¹`` (``b M⁻ᵀ`` with ``transpose``), ``M`` the weight with its axes
        permuted to ``axes`` and reshaped to a square matrix of ``b``'s width. Where ``b``
        has more rows than ``M`` has, through ``M⁻¹`` (``inverse``): XLA's triangular
        solves cost in proportion to their right-hand sides, a matrix product far less."""
        n = b.shape[-1]
        if b.shape[0] > n:
            inverse = self.inverse(axes, n, b.dtype)  # at full precision, as a solve is
            return jnp.matmul(b, inverse.T if transpose else inverse,
                              precision=lax.Precision.HIGHEST)
        return self._solve(b, axes, transpose=transpose)

    def inverse(self, axes, n: int, dtype):
        """``M⁻¹``, solved with the factors or the LU for the ``n`` rows of the identity,
        once per weight, axes and dtype."""
        key = ("inverse", tuple(axes), jnp.dtype(dtype))
        if key not in self.cache:
            self.cache[key] = self._solve(jnp.eye(n, dtype=dtype), axes, transpose=False)
        return self.cache[key]

    def _solve(self, b, axes, *, transpose: bool):
        n = b.shape[-1]
        if self.factors is not None and self.value.ndim == 2 and tuple(axes) in ((0, 1),
                                                                                  (1, 0)):
            chain = self.factors  # M = F₁ ⋯ F_k, or Mᵀ when the axes are swapped
            if tuple(axes) == (1, 0):
                chain = [(f.T, v) for f, v in reversed(chain)]
            # b M⁻¹ = b F_k⁻¹ ⋯ F₁⁻¹;  b M⁻ᵀ = b F₁⁻ᵀ ⋯ F_k⁻ᵀ
            for f, v in (chain if transpose else reversed(chain)):
                b = _solve_factor(f, v, b, transpose=transpose)
            return b
        lu, _, perm = self.lu(axes, n, b.dtype)  # M[perm] = L U, i.e. M = Pᵀ L U
        if transpose:  # x Mᵀ = b  <=>  x Uᵀ Lᵀ = b Pᵀ = b[:, perm]
            t = triangular_solve(lu, b[:, perm], left_side=False, lower=True,
                                 transpose_a=True, unit_diagonal=True)
            return triangular_solve(lu, t, left_side=False, lower=False, transpose_a=True)
        # x M = b  <=>  (x Pᵀ) L U = b: solve against U, then L, then undo the permutation
        s = triangular_solve(lu, b, left_side=False, lower=False)
        u = triangular_solve(lu, s, left_side=False, lower=True, unit_diagonal=True)
        return u[:, jnp.argsort(perm)]
