"""Measurements: XLA memory accounting, interleaved timing, gradient error, budget search.

Memory comes from XLA itself: ``jax.jit(f).lower(*args).compile().memory_analysis()``
gives the bytes of the compiled program's arguments, outputs and temporaries. It is
exact and machine-independent, and needs no run, so the largest depth under a budget
is found by compiling only (arguments may be ``jax.ShapeDtypeStruct`` s).
"""

from __future__ import annotations

import dataclasses
import math
import re
import statistics
import time
from collections.abc import Callable, Mapping

import jax
import numpy as np

# -- memory ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Memory:
    """XLA's byte counts for one compiled program."""

    temp: int
    argument: int
    output: int
    alias: int

    @property
    def peak(self) -> int:
        """Everything the device holds while the program runs: inputs, outputs, temporaries."""
        return self.argument + self.output + self.temp - self.alias


def memory_of(compiled) -> Memory:
    m = compiled.memory_analysis()
    return Memory(
        int(m.temp_size_in_bytes),
        int(m.argument_size_in_bytes),
        int(m.output_size_in_bytes),
        int(m.alias_size_in_bytes),
    )


def compile_timed(fn: Callable, *args) -> tuple[object, float, Memory]:
    """``(compiled, seconds to trace + lower + compile, memory)`` of ``jax.jit(fn)``."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - t0, memory_of(compiled)


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(text: str) -> int:
    """``"1GiB"`` → 1073741824; also ``512MiB``, ``2GB``, ``1.5e9``, plain integers."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a byte size: {text!r} (try 1GiB, 512MiB, 2GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


# -- time ------------------------------------------------------------------------------------


def time_interleaved(
    calls: Mapping[str, Callable[[], object]],
    repeats: int,
    *,
    warmup: int = 1,
    max_seconds: float = 20.0,
) -> dict[str, list[float]]:
    """Wall-clock seconds of each call, interleaved round by round.

    After ``warmup`` untimed rounds, each of ``repeats`` rounds runs every call once
    (the order rotates each round, so no call always follows the same neighbour) and
    waits for its result with ``block_until_ready``. A call stops being repeated once
    its timed runs add up to ``max_seconds`` (it always gets at least one).
    """
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            jax.block_until_ready(calls[name]())
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(max(repeats, 1)):
        k = r % len(names) if names else 0
        for name in names[k:] + names[:k]:
            if times[name] and sum(times[name]) >= max_seconds:
                continue
            t0 = time.perf_counter()
            jax.block_until_ready(calls[name]())
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


# -- accuracy --------------------------------------------------------------------------------


def relative_error(grads, reference) -> float:
    """``‖g − g_ref‖ / ‖g_ref‖`` over all leaves together (float64 arithmetic)."""
    a = jax.tree_util.tree_leaves(grads)
    b = jax.tree_util.tree_leaves(reference)
    if len(a) != len(b):
        raise ValueError("gradient and reference have different structures")
    num = sum(
        float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2))
        for x, y in zip(a, b, strict=True)
    )
    den = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in b)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


# -- the largest depth under a budget --------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DepthLimit:
    """Result of ``largest_depth``.

    Attributes:
      depth: the largest depth whose memory is within the budget (0 if even depth 1
        is over it).
      capped: ``True`` when ``depth`` is the search cap, which still fits.
      evaluations: how many depths were compiled (memory looked up), seeds excluded.
    """

    depth: int
    capped: bool
    evaluations: int


def largest_depth(
    bytes_at: Callable[[int], int],
    budget: int,
    *,
    cap: int = 2**20,
    known: Mapping[int, int] | None = None,
) -> DepthLimit:
    """The largest depth ``d ≤ cap`` with ``bytes_at(d) ≤ budget``.

    ``bytes_at`` must be nondecreasing in depth. The search brackets the answer by
    growing the depth at least twofold (further, up to 16x, where the line through the
    last two fitting depths says the budget is further away; straight to that line's
    crossing when the last three lie on one line), then narrows the bracket
    ``[fits, does not fit]`` by bisection. A narrowing step tries the depth where the
    line through the bracket's ends meets the budget (Illinois false position), which is
    exact in one or two steps when memory is affine in depth, as it is for a scanned
    stack, and a step that fails to halve the bracket is followed by a plain bisection
    step, so the search never needs much more than twice the steps of bisection. With
    compile-time memory figures nothing is ever run, so nothing can run out of memory.

    Args:
      bytes_at: depth → bytes (e.g. XLA's peak bytes of the compiled gradient).
      budget: the budget in bytes.
      cap: the largest depth considered.
      known: depth → bytes already measured (they seed the search for free).

    Returns:
      A ``DepthLimit``.
    """
    memo = dict(known or {})
    count = 0

    def f(d: int) -> int:
        nonlocal count
        if d not in memo:
            memo[d] = int(bytes_at(d))
            count += 1
        return memo[d]

    def bracket():
        fit = [d for d, b in memo.items() if b <= budget and d <= cap]
        over = [d for d, b in memo.items() if b > budget]
        return max(fit, default=0), min(over, default=None)

    def line_hit(d0: int, d1: int) -> float | None:
        b0, b1 = memo[d0], memo[d1]
        if d1 == d0 or b1 <= b0:
            return None
        return d0 + (budget - b0) * (d1 - d0) / (b1 - b0)

    lo, hi = bracket()
    if lo == 0 and (hi is None or hi > 1):
        if f(1) > budget:
            return DepthLimit(0, False, count)
        lo, hi = bracket()
    if hi is not None and hi <= lo:
        raise ValueError("bytes_at is not nondecreasing in depth")
    # Grow until a depth is over the budget (or the cap fits): at least 2x, and at most
    # 16x unless the last three fitting depths lie on one line (memory affine in depth).
    while hi is None:
        if lo >= cap:
            return DepthLimit(cap, True, count)
        fits = sorted(d for d, b in memo.items() if b <= budget)
        guess = line_hit(fits[-2], fits[-1]) if len(fits) >= 2 else None
        reach = 16 * lo
        if guess is not None and len(fits) >= 3:
            far = line_hit(fits[-3], fits[-1])
            if far is not None and abs(far - guess) <= 0.01 * guess:
                reach = cap
        step = 2 * lo if guess is None else min(reach, max(2 * lo, math.floor(guess) + 1))
        f(min(cap, step))
        lo, hi = bracket()
    # Narrow the bracket [lo fits, hi does not] by the Illinois variant of the false
    # position method: when the same end survives twice, its weight is halved, so the
    # trial depth moves towards it instead of creeping up from one side.
    if hi - lo <= 1:
        return DepthLimit(lo, False, count)
    over_lo, over_hi = memo[lo] - budget, memo[hi] - budget  # <= 0 and > 0
    side = 0
    while hi - lo > 1:
        width = hi - lo
        d = math.floor(lo + (hi - lo) * (-over_lo) / (over_hi - over_lo))
        d = min(max(d, lo + 1), hi - 1)
        if f(d) <= budget:
            lo, over_lo = d, memo[d] - budget
            over_hi = over_hi / 2 if side == -1 else over_hi
            side = -1
        else:
            hi, over_hi = d, memo[d] - budget
            over_lo = over_lo / 2 if side == 1 else over_lo
            side = 1
        if (hi - lo) * 2 > width and hi - lo > 1:  # no halving: one bisection step
            d = (lo + hi) // 2
            if f(d) <= budget:
                lo, over_lo = d, memo[d] - budget
            else:
                hi, over_hi = d, memo[d] - budget
            side = 0
    lo_check, hi_check = bracket()
    if hi_check is not None and hi_check <= lo_check:
        raise ValueError("bytes_at is not nondecreasing in depth")
    return DepthLimit(lo, False, count)
