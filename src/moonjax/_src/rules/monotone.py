"""A static proof that an elementwise map ``φ`` has a derivative that never vanishes.

The sweep crosses a region of elementwise primitives by ``g / φ'(x)``, which is the
exact vijp wherever ``φ'(x) ≠ 0``. The per-primitive checks of
``moonjax._src.rules.elementwise`` accept regions built from monotone pieces
(``tanh``, ``x + b``, leaky-ReLU's ``select_n``); many strictly monotone activations
are not written that way — ``jax.nn.softplus`` is ``max(x, 0) + log1p(exp(-|x|))``,
ELU and CELU select between branches with ``max``/``min`` — so those checks cannot see
it. This module proves it instead from ``φ'`` itself:

* ``φ'`` is traced as a scalar program (one JVP with tangent 1 through the region);
* that program is evaluated in *interval arithmetic* over pieces of the real line
  split at the constants it compares with, each interval keeping whether its ends are
  attained (``exp`` of anything is in the open interval ``(0, ∞)``);
* values also keep an *identity*: ``max(x, 0)`` on ``x > 0`` **is** ``x``, so the
  comparison ``x == max(x, 0)`` that JAX's ``max`` derivative makes is decided.

``φ'`` keeps one sign when every open piece's interval excludes 0; at the finitely
many breakpoints themselves (kinks such as ``|x|`` at 0) the derivative of the
flattened program may be 0 — as for ``x ** 3`` at 0 — while the map stays strictly
monotone.
The proof is in real arithmetic: where ``φ'`` underflows in floating point (softplus
below ``x ≈ -745`` in float64) the sweep divides by zero, as it does for ``tanh`` far
in its tails; ``debug=True`` reports it. Anything the analysis cannot bound (an
unknown primitive, a value computed outside the region) is the whole real line, so a
failed proof only means the sweep records a fragment instead.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np
from jax import lax

from moonjax._src import graph as G
from moonjax._src.rules import elementwise_rules

INF = math.inf


class Interval(NamedTuple):
    """The real interval between ``lo`` and ``hi``; an end is excluded when its
    ``*_open`` flag is set (infinite ends are always excluded)."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False

    @staticmethod
    def make(lo, hi, lo_open=False, hi_open=False):
        if math.isnan(lo) or math.isnan(hi):
            return WHOLE
        return Interval(float(lo), float(hi), lo_open or math.isinf(lo),
                        hi_open or math.isinf(hi))

    def point(self):
        return self.lo == self.hi and not (self.lo_open or self.hi_open)

    def positive(self) -> bool:
        return self.lo > 0 or (self.lo == 0 and self.lo_open)

    def negative(self) -> bool:
        return self.hi < 0 or (self.hi == 0 and self.hi_open)


WHOLE = Interval(-INF, INF, True, True)
TRUE, FALSE, EITHER = Interval(1, 1), Interval(0, 0), Interval(0, 1)


def _point(c):
    return Interval.make(c, c)


def _hull(*xs):
    lo = min(x.lo for x in xs)
    hi = max(x.hi for x in xs)
    return Interval.make(lo, hi, all(x.lo_open for x in xs if x.lo == lo),
                         all(x.hi_open for x in xs if x.hi == hi))


def _neg(a):
    return Interval.make(-a.hi, -a.lo, a.hi_open, a.lo_open)


def _add(a, b):
    return Interval.make(a.lo + b.lo, a.hi + b.hi, a.lo_open or b.lo_open,
                         a.hi_open or b.hi_open)


def _end_products(x, xo, sx, y, yo, sy):
    """Candidate ``(value, open)`` extremes of the product near two interval ends;
    ``sx``/``sy`` is the side (+1 lower end, -1 upper end) the interval lies on."""
    if (x == 0 and not xo) or (y == 0 and not yo):
        return [(0.0, False)]  # an attained zero times anything in the other interval
    if (x == 0 and math.isinf(y)) or (y == 0 and math.isinf(x)):
        # 0⁺·∞: the products near these ends sweep from 0 to ±∞
        sign = (sx if x == 0 else math.copysign(1, x)) * (sy if y == 0 else math.copysign(1, y))
        return [(0.0, True), (math.copysign(INF, sign), True)]
    return [(x * y, xo or yo)]


def _mul(a, b):
    ends = [e for x, xo, sx in ((a.lo, a.lo_open, 1), (a.hi, a.hi_open, -1))
            for y, yo, sy in ((b.lo, b.lo_open, 1), (b.hi, b.hi_open, -1))
            for e in _end_products(x, xo, sx, y, yo, sy)]
    lo = min(v for v, _ in ends)
    hi = max(v for v, _ in ends)
    return Interval.make(lo, hi, all(o for v, o in ends if v == lo),
                         all(o for v, o in ends if v == hi))


def _recip(b):
    if b.positive() or b.negative():
        lo = 1 / b.hi if b.hi else -INF
        hi = 1 / b.lo if b.lo else INF
        return Interval.make(lo, hi, b.hi_open, b.lo_open)
    return WHOLE


def _increasing(f, lo_domain=-INF, strict_domain=False):
    """An increasing function of one interval, defined above ``lo_domain``."""

    def rule(a):
        if a.lo < lo_domain or (strict_domain and a.lo == lo_domain and not a.lo_open):
            return WHOLE
        return Interval.make(f(a.lo), f(a.hi), a.lo_open, a.hi_open)

    return rule


def _safe(f):
    def g(x):
        try:
            return f(x)
        except OverflowError:
            return INF
        except ValueError:
            return math.nan

    return g


def _logistic(x):
    return 0.5 * (1 + math.tanh(x / 2))


def _abs(a):
    if a.lo >= 0:
        return a
    if a.hi <= 0:
        return _neg(a)
    top = max((-a.lo, a.lo_open), (a.hi, a.hi_open), key=lambda e: (e[0], not e[1]))
    return Interval.make(0, top[0], False, top[1])


def _pow(a, n):
    if n == 0:
        return _point(1.0)
    if n < 0:
        return _recip(_pow(a, -n))
    if n % 2 == 0:
        a = _abs(a)
    return Interval.make(_safe(lambda x: x ** n)(a.lo), _safe(lambda x: x ** n)(a.hi),
                         a.lo_open, a.hi_open)


def _max(a, b):
    hi = max(a.hi, b.hi)
    lo = max(a.lo, b.lo)
    return Interval.make(lo, hi, all(x.lo_open for x in (a, b) if x.lo == lo),
                         all(x.hi_open for x in (a, b) if x.hi == hi))


def _min(a, b):
    return _neg(_max(_neg(a), _neg(b)))


def _less(a, b):
    """The truth of ``a < b``."""
    if a.hi < b.lo or (a.hi == b.lo and (a.hi_open or b.lo_open)):
        return TRUE
    if a.lo >= b.hi:
        return FALSE
    return EITHER


def _sign(a):
    if a.positive():
        return _point(1.0)
    if a.negative():
        return _point(-1.0)
    return Interval.make(-1.0 if a.lo < 0 else 0.0, 1.0 if a.hi > 0 else 0.0)


_UNARY = {
    lax.neg_p: _neg,
    lax.exp_p: _increasing(_safe(math.exp)),
    lax.exp2_p: _increasing(_safe(lambda x: 2.0 ** x)),
    lax.expm1_p: _increasing(_safe(math.expm1)),
    lax.log_p: _increasing(_safe(lambda x: math.log(x) if x else -INF), 0.0, True),
    lax.log1p_p: _increasing(_safe(lambda x: math.log1p(x) if x != -1 else -INF), -1.0, True),
    lax.tanh_p: _increasing(math.tanh),
    lax.logistic_p: _increasing(_logistic),
    lax.erf_p: _increasing(math.erf),
    lax.erfc_p: lambda a: _add(_point(1.0), _increasing(math.erf)(_neg(a))),  # 1 + erf(-a)
    lax.atan_p: _increasing(math.atan),
    lax.asinh_p: _increasing(math.asinh),
    lax.sinh_p: _increasing(_safe(math.sinh)),
    lax.sqrt_p: _increasing(_safe(math.sqrt), 0.0),
    lax.cbrt_p: _increasing(lambda x: math.copysign(abs(x) ** (1 / 3), x)),
    lax.rsqrt_p: lambda a: _recip(_increasing(_safe(math.sqrt), 0.0)(a)),
    lax.abs_p: _abs,
    lax.sign_p: _sign,
    lax.square_p: lambda a: _pow(a, 2),
    lax.cosh_p: lambda a: _add(_point(1.0), _mul(_point(0.0), a)) if a.point() and a.lo == 0
    else _increasing(_safe(math.cosh))(_abs(a)),
}

# primitives that return their operand unchanged as a real number
_IDENTITY = {lax.convert_element_type_p, lax.copy_p, lax.reduce_precision_p,
             lax.broadcast_in_dim_p, lax.reshape_p, lax.squeeze_p}
_IDENTITY |= {p for p in (getattr(lax, "copy_p", None), getattr(lax, "optimization_barrier_p",
                                                                  None)) if p is not None}


class _Entry(NamedTuple):
    """A value of the analysed program: its interval and an identity token (two
    values with one token are the same real number)."""

    iv: Interval
    ident: object


def _evaluate(graph: G.Graph, inputs):
    """Interval evaluation of ``graph``; ``inputs`` are ``_Entry`` s of its invars."""
    env = {id(v): e for v, e in zip(graph.invars, inputs)}

    def read(a):
        if isinstance(a, G.Lit):
            if np.asarray(a.val).dtype.kind == "V":  # float0: a tangent of nothing
                return _Entry(WHOLE, object())
            vals = np.asarray(a.val, dtype=np.float64)
            if vals.size == 0:
                return _Entry(WHOLE, object())
            lo, hi = float(vals.min()), float(vals.max())
            return _Entry(Interval.make(lo, hi), ("lit", lo) if lo == hi else object())
        return env[id(a)]

    for node in graph.nodes:
        ins = [read(a) for a in node.inputs]
        env.update(zip(map(id, node.outputs), _step(node, ins)))
    return [read(o) for o in graph.outvars]


def _fresh(iv):
    return _Entry(iv, ("lit", iv.lo) if iv.point() else object())


def _step(node, ins):
    p = node.primitive
    n_out = len(node.outputs)
    if p in _IDENTITY and len(ins) == 1:
        return [ins[0]]
    if p in _UNARY:
        return [_fresh(_UNARY[p](ins[0].iv))]
    if p is lax.integer_pow_p:
        return [_fresh(_pow(ins[0].iv, node.params["y"]))]
    if p in (lax.add_p, lax.sub_p):
        a, b = ins
        if b.iv == _point(0.0):
            return [a]
        if p is lax.add_p and a.iv == _point(0.0):
            return [b]
        return [_fresh(_add(a.iv, b.iv if p is lax.add_p else _neg(b.iv)))]
    if p in (lax.mul_p, lax.div_p):
        a, b = ins
        if b.iv == _point(1.0):
            return [a]
        if p is lax.mul_p and a.iv == _point(1.0):
            return [b]
        return [_fresh(_mul(a.iv, b.iv if p is lax.mul_p else _recip(b.iv)))]
    if p in (lax.max_p, lax.min_p):
        a, b = ins
        top, bottom = (a, b) if p is lax.max_p else (b, a)
        if a.ident == b.ident or _less(a.iv, b.iv) == FALSE:  # a >= b everywhere
            return [top]
        if _less(b.iv, a.iv) == FALSE:  # b >= a everywhere
            return [bottom]
        return [_fresh((_max if p is lax.max_p else _min)(a.iv, b.iv))]
    if p is lax.select_n_p:
        which, *cases = ins
        lo = int(math.ceil(max(which.iv.lo, 0)))
        hi = int(math.floor(min(which.iv.hi, len(cases) - 1)))
        chosen = cases[max(lo, 0):min(hi, len(cases) - 1) + 1] or cases
        if len(chosen) == 1 or len({c.ident for c in chosen}) == 1:
            return [chosen[0]]
        return [_fresh(_hull(*(c.iv for c in chosen)))]
    if p in (lax.lt_p, lax.gt_p, lax.le_p, lax.ge_p, lax.eq_p, lax.ne_p):
        a, b = ins
        if p in (lax.gt_p, lax.ge_p):
            a, b = b, a
        if p in (lax.lt_p, lax.gt_p):
            truth = FALSE if a.ident == b.ident else _less(a.iv, b.iv)
        elif p in (lax.le_p, lax.ge_p):
            truth = TRUE if a.ident == b.ident else _not(_less(b.iv, a.iv))
        else:
            if a.ident == b.ident or (a.iv.point() and a.iv == b.iv):
                truth = TRUE
            elif _less(a.iv, b.iv) == TRUE or _less(b.iv, a.iv) == TRUE:
                truth = FALSE
            else:
                truth = EITHER
            if p is lax.ne_p:
                truth = _not(truth)
        return [_fresh(truth)]
    if p is lax.not_p:
        return [_fresh(_not(ins[0].iv))]
    if p is lax.and_p:
        return [_fresh(_mul(ins[0].iv, ins[1].iv))]
    if p is lax.is_finite_p:
        return [_fresh(TRUE)]  # real arithmetic
    return [_Entry(WHOLE, object()) for _ in range(n_out)]


def _not(t):
    return TRUE if t == FALSE else FALSE if t == TRUE else EITHER


def _pieces(breaks):
    """Open intervals between sorted breakpoints, and the breakpoints themselves."""
    pts = sorted(set(breaks) | {0.0})
    out = [Interval(-INF, pts[0], True, True)]
    for a, b in zip(pts, pts[1:]):
        out += [_point(a), Interval(a, b, True, True)]
    out += [_point(pts[-1]), Interval(pts[-1], INF, True, True)]
    return out


def _with_masks(order, v):
    """``order`` and the comparisons of ``v`` it reads (``x > 0`` of ELU: the sweep
    settles boolean nodes early, so they are not part of the region it hands over)."""
    nodes = {id(n): n for n in order}
    changed = True
    while changed:
        changed = False
        made = {id(o) for n in nodes.values() for o in n.outputs} | {id(v)}
        for n in list(nodes.values()):
            for a in n.inputs:
                p = getattr(a, "producer", None)
                if p is None or id(p) in nodes or id(a) in made:
                    continue
                if p.primitive in elementwise_rules and all(
                        not isinstance(b, G.Value) or id(b) in made for b in p.inputs):
                    nodes[id(p)] = p
                    changed = True
    return sorted(nodes.values(), key=lambda n: n.index)


def _reads(node, inside):
    if any(isinstance(a, G.Value) and id(a) in inside for a in node.inputs):
        inside.update(id(o) for o in node.outputs)
        return True
    return False


def _static_value(a, depth=8):
    """The value of ``a`` if it is computed from literals alone (``jnp.zeros_like``'s
    broadcast of ``0.0``), else ``None``."""
    if isinstance(a, G.Lit):
        return np.asarray(a.val)
    node = a.producer
    if node is None or depth == 0 or len(node.outputs) != 1:
        return None
    ins = [_static_value(b, depth - 1) for b in node.inputs]
    if any(i is None for i in ins):
        return None
    with jax.ensure_compile_time_eval():
        return np.asarray(node.bind(*ins)[0])


def _hull_of(val):
    if val is None or not np.size(val) or not np.issubdtype(val.dtype, np.number):
        return WHOLE
    return Interval.make(float(np.min(val)), float(np.max(val)))


def _dtype_of(key, order):
    for n in order:
        for a in n.inputs:
            if id(a) == key:
                return a.aval.dtype
    raise KeyError(key)


def derivative_sign(order, v, y, read) -> int | None:
    """``+1``/``-1`` if ``φ'(x) > 0`` / ``< 0`` for every real ``x``, where ``φ`` maps
    the value ``v`` to ``y`` through the elementwise nodes ``order``; else ``None``.

    ``read(a)`` gives the value of an operand from outside the region (a literal or a
    value the sweep computed); those count as the whole real line unless constant.
    """
    order = _with_masks(order, v)
    inside = {id(v)}
    order = [n for n in order if _reads(n, inside)]  # the nodes that depend on v
    inside = {id(v)}
    outer = []  # operands from outside the region: their intervals
    for n in order:
        for a in n.inputs:
            if isinstance(a, G.Value) and id(a) not in inside and all(a is not o for o in outer):
                outer.append(a)
        inside.update(id(o) for o in n.outputs)
    dtype = v.aval.dtype
    known = [_static_value(a) for a in outer]  # constants computed outside the region
    fixed = {id(a): np.asarray(k).reshape(-1)[0] for a, k in zip(outer, known)
             if k is not None and np.size(k)
             and np.all(np.asarray(k) == np.asarray(k).reshape(-1)[0])}
    outer = [a for a in outer if id(a) not in fixed]
    hulls = [_hull_of(_static_value(a)) for a in outer]

    def phi(x, *others):
        env = {id(v): x}
        env.update({k: np.asarray(c, n_dtype) for k, (c, n_dtype) in
                    ((k, (c, _dtype_of(k, order))) for k, c in fixed.items())})
        env.update({id(a): o for a, o in zip(outer, others)})
        for n in order:
            ins = [a.val if isinstance(a, G.Lit) else env[id(a)] for a in n.inputs]
            env.update(zip(map(id, n.outputs), n.bind(*ins)))
        return env[id(y)]

    def dphi(x, *others):
        return jax.jvp(lambda t: phi(t, *others), (x,), (np.ones((), dtype),))[1]

    scalars = [jax.ShapeDtypeStruct((), a.aval.dtype) for a in outer]
    try:
        closed = jax.make_jaxpr(dphi)(jax.ShapeDtypeStruct((), dtype), *scalars)
    except Exception:  # an operand the scalar model cannot take: no proof
        return None
    graph, consts = G.flatten(closed)
    const_entries = [_Entry(Interval.make(float(np.min(c)), float(np.max(c))), object())
                     if np.size(c) and np.issubdtype(np.asarray(c).dtype, np.number)
                     else _Entry(WHOLE, object()) for c in consts]
    breaks = set()
    for node in graph.nodes:
        for a in node.inputs:
            if isinstance(a, G.Lit) and np.size(a.val) == 1:
                c = float(np.asarray(a.val, dtype=np.float64).reshape(()))
                if math.isfinite(c):
                    breaks.update((c, -c))
    others = [_Entry(h, object()) for h in hulls]
    signs, at_points = set(), []
    for piece in _pieces(breaks):
        x = _Entry(piece, object())
        (d,) = _evaluate(graph, const_entries + [x] + others)
        if d.iv.positive():
            signs.add(1)
        elif d.iv.negative():
            signs.add(-1)
        elif piece.point():
            at_points.append(d.iv)  # a kink: φ' may vanish at this one point
        else:
            return None
    if len(signs) != 1:
        return None
    sign = signs.pop()
    if any((iv.negative() if sign > 0 else iv.positive()) for iv in at_points):
        return None
    return sign
