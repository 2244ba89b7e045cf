"""Fit the public piecewise-cubic table of a smooth activation (``privmed.ir.approx``).

Method (the spline-on-comparison-selected-intervals approach of SIRNN, Rathee et al., S&P
2021, sec. 5, and of CrypTen's piecewise approximations, here with a least-squares cubic per
interval instead of lookup tables):

1. Asymptotes. The outer intervals hold the function's limits: 0 and 1 for Sigmoid, -1 and 1
   for Tanh and Erf, 0 and x for SiLU and both GELUs, 0 and 1 for exp(min(x, 0)) (softmax's
   exponential after the row maximum is subtracted; its interior ends at 0). R is the
   smallest multiple of 1/16 with |f(x) - asymptote| <= eps for all |x| >= R (checked on
   [R, R + 64]; every error there decreases with |x|), so the table is valid for every input,
   not only a calibrated range.
2. Interior. From -R, each interval is grown in steps of 1/16, to a width of at most 2 (so
   |u| <= 1 and coefficient rounding costs at most (d + 1) / 2 units of 2^-f), while the
   Chebyshev least-squares cubic in u = x - m (m the midpoint rounded to 1/64) stays within
   eps of f on a 2,000-point grid of the interval; the knots are multiples of 1/16.

With eps = 1e-4 (about 6.5 units in the last place at the default 16 fractional bits), the
tables have (knots): Sigmoid 12, Tanh 12, Erf 11, SiLU 16, GELU 11, GELU-tanh 11, exp 8; the
measured maximum error of each is returned as ``fit_error`` (tests/protocol/test_approx.py
re-measures it in fixed point over the whole real line). The compiler fits each function
once per model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from privmed.ir.approx import exact

DEGREE = 3
EPS = 1e-4
STEP = 1.0 / 16
MAX_WIDTH = 2.0  # |u| <= 1: coefficient rounding then adds at most (d + 1) / 2 units of 2^-f
TAIL_CHECK = 64.0

# fn: (value below -R, value above R as (constant, slope)) -- the asymptotes
ASYMPTOTES: dict[str, tuple[float, tuple[float, float]]] = {
    "sigmoid": (0.0, (1.0, 0.0)),
    "tanh": (-1.0, (1.0, 0.0)),
    "erf": (-1.0, (1.0, 0.0)),
    "silu": (0.0, (0.0, 1.0)),
    "gelu": (0.0, (0.0, 1.0)),
    "gelu_tanh": (0.0, (0.0, 1.0)),
    "expneg": (0.0, (1.0, 0.0)),
}
INTERIOR_END = {"expneg": 0.0}  # exp(min(x, 0)) is exactly 1 from 0 on: no knots there


def _tail_radius(fn: str, eps: float) -> tuple[float, float]:
    """(R, the largest error of the asymptotes on |x| >= R)."""
    f = exact(fn)
    low, (const, slope) = ASYMPTOTES[fn]
    r = STEP
    while True:
        xs = np.linspace(r, r + TAIL_CHECK, 4097)
        err = max(float(np.max(np.abs(f(-xs) - low))), float(np.max(np.abs(f(xs) - const - slope * xs))))
        if err <= eps:
            return r, err
        r += STEP


def _fit(fn: str, a: float, b: float, degree: int) -> tuple[float, np.ndarray, float]:
    f = exact(fn)
    m = round((a + b) / 2 * 64) / 64
    xs = np.linspace(a, b, 257)
    cheb = np.polynomial.chebyshev.Chebyshev.fit(xs - m, f(xs), degree)
    coef = np.zeros(degree + 1)
    c = cheb.convert(kind=np.polynomial.Polynomial).coef
    coef[: len(c)] = c
    grid = np.linspace(a, b, 2000)
    err = float(np.max(np.abs(np.polynomial.polynomial.polyval(grid - m, coef) - f(grid))))
    return m, coef, err


def fit_table(fn: str, degree: int = DEGREE, eps: float = EPS) -> dict[str, Any]:
    """The plan attributes ``knots``, ``centers``, ``coeffs`` of ``fn`` and its measured error
    ``fit_error`` (steps 1-2 of the module docstring)."""
    r, worst = _tail_radius(fn, eps)
    low, (const, slope) = ASYMPTOTES[fn]
    knots, centers, coeffs = [-r], [0.0], [[low] + [0.0] * degree]
    a, end = -r, INTERIOR_END.get(fn, r)
    while a < end:
        best = None
        b = a + STEP
        while b <= min(end, a + MAX_WIDTH) + 1e-12:
            m, coef, err = _fit(fn, a, b, degree)
            if err > eps:
                break
            best = (b, m, coef, err)
            b += STEP
        if best is None:
            raise ValueError(f"no degree-{degree} fit of {fn} within {eps} on [{a}, {a + STEP}]")
        b, m, coef, err = best
        knots.append(b)
        centers.append(m)
        coeffs.append([float(c) for c in coef])
        worst = max(worst, err)
        a = b
    centers.append(0.0)
    coeffs.append([const, slope] + [0.0] * (degree - 1))
    return {"knots": [float(k) for k in knots], "centers": centers, "coeffs": coeffs, "fit_error": worst}
