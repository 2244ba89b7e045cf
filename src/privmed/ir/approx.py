"""Smooth activations (Sigmoid, Tanh, Erf, SiLU, GELU, GELU-tanh, and softmax's exp(min(x, 0)))
as public piecewise cubics: the one fixed-point algorithm that the reference runs on values and
the secure runtime on shares (``privmed.mpc.approx`` supplies the ops), and the exact functions
they approximate.

An ``approx`` node carries its table in the plan (public): interior knots t_1 < ... < t_{K-1},
and for each of the K intervals (-inf, t_1), [t_1, t_2), ..., [t_{K-1}, inf) a center m_j and
the coefficients c_j0..c_jd of p_j(u) = sum_k c_jk u^k in the local coordinate u = x - m_j.
The outer intervals hold the function's asymptote (a constant, or x for SiLU and GELU) with
m = 0, so no input is ever clamped. ``privmed.compiler.approx`` fits the table and measures its
error; the algorithm, for x at scale f:

1. b_j = [x >= t_j] for every knot (one comparison of x with all the knots; scale 0).
2. Interval selection by telescoping: for any per-interval constant v_j,
   v(x) = v_0 + sum_j b_j (v_j - v_{j-1}) is v_j on interval j; a public linear map of the bits.
   This gives the secret center M (scale f) and coefficients C_k (scale f) of x's interval.
3. u = x - M (local); powers u^k = trunc(u^(k-1) * u) at scale f (k = 2..d).
4. y = C_0 2^f + sum_k C_k u^k, at scale 2f (the next op truncates, as after a linear layer).

The outer intervals' powers of an unbounded u may wrap the ring, but they are multiplied by
coefficients that are exactly 0 (shares of 0 times anything is exactly 0 in Z_2^64), so the
result is exact there. Knots and centers are multiples of 2^-6, exact at any f >= 6.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from privmed.ring.fixed import U64, arith_shift, encode, signed

FUNCTIONS = ("sigmoid", "tanh", "erf", "silu", "gelu", "gelu_tanh", "expneg")  # expneg(x) = exp(min(x, 0)): softmax's


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(np.asarray(x, dtype=np.float64))


def exact(fn: str) -> Callable[[np.ndarray], np.ndarray]:
    """The float function an ``approx`` node stands for (what onnxruntime computes)."""

    def sigmoid(x: np.ndarray) -> np.ndarray:
        return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # no overflow for large |x|

    def gelu_tanh(x: np.ndarray) -> np.ndarray:  # ONNX Gelu(approximate="tanh")
        x = np.asarray(x, dtype=np.float64)
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))

    table: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "sigmoid": sigmoid,
        "tanh": lambda x: np.tanh(np.asarray(x, dtype=np.float64)),
        "erf": _erf,
        "silu": lambda x: np.asarray(x, dtype=np.float64) * sigmoid(x),
        "gelu": lambda x: 0.5 * np.asarray(x, dtype=np.float64) * (1.0 + _erf(np.asarray(x) / math.sqrt(2.0))),
        "gelu_tanh": gelu_tanh,
        "expneg": lambda x: np.exp(np.minimum(np.asarray(x, dtype=np.float64), 0.0)),
    }
    return table[fn]


class ApproxOps(Protocol):
    def const(self, value: np.ndarray) -> np.ndarray: ...
    def sign_thresholds(self, x: np.ndarray, thresholds: np.ndarray) -> np.ndarray: ...
    def square(self, x: np.ndarray) -> np.ndarray: ...
    def mul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...
    def trunc(self, x: np.ndarray, shift: int) -> np.ndarray: ...
    def relu(self, x: np.ndarray) -> np.ndarray: ...


def _select(bits: np.ndarray, values: np.ndarray, ops: ApproxOps) -> np.ndarray:
    """Step 2: sum_j b_j (v_j - v_{j-1}) + v_0 for ring-encoded per-interval v (K, ...) and bits
    (K-1, n): the encoded v_j of each element's interval, exactly."""
    steps = (values[1:] - values[:-1]).reshape(values.shape[0] - 1, *([1] * (bits.ndim - 1)))
    return ops.const(np.broadcast_to(values[0], bits.shape[1:]).copy()) + (bits * steps).sum(axis=0, dtype=U64)


def piecewise(ops: ApproxOps, x: np.ndarray, attrs: dict[str, Any], f: int) -> np.ndarray:
    """Steps 1-4 of the module docstring on x (scale f); the result is at scale 2f."""
    shape = x.shape
    flat = np.ascontiguousarray(x.reshape(-1))
    bits = ops.sign_thresholds(flat, encode(np.asarray(attrs["knots"], dtype=np.float64), f))  # (K - 1, n)
    centers = encode(np.asarray(attrs["centers"], dtype=np.float64), f)
    coeffs = encode(np.asarray(attrs["coeffs"], dtype=np.float64), f)  # (K, d + 1)
    u = flat - _select(bits, centers, ops)
    powers = [u]
    for _ in range(coeffs.shape[1] - 2):
        nxt = ops.square(u) if len(powers) == 1 else ops.mul(powers[-1], u)
        powers.append(ops.trunc(nxt, f))
    c = [_select(bits, coeffs[:, k], ops) for k in range(coeffs.shape[1])]
    y = c[0] << U64(f)
    if len(powers):
        y = y + ops.mul(np.stack(c[1:]), np.stack(powers)).sum(axis=0, dtype=U64)
    return y.reshape(shape)


def fixed_point_error(attrs: dict[str, Any], f: int) -> float:
    """Bound on |fixed-point result - exact cubic on the same (exact) x| at scale 2f, before
    the consumer's truncation: coefficient rounding (2^-(f+1) each, times |u|^k) and the power
    truncations (each within one unit of 2^-f, times |C_k|). Outer intervals are exact (their
    coefficients are 0, 1 or the asymptote, all exact)."""
    knots = np.asarray(attrs["knots"], dtype=np.float64)
    centers = np.asarray(attrs["centers"], dtype=np.float64)
    coeffs = np.asarray(attrs["coeffs"], dtype=np.float64)
    ulp = 2.0**-f
    worst = 0.0
    for j in range(1, len(knots)):
        umax = max(abs(knots[j - 1] - centers[j]), abs(knots[j] - centers[j]))
        err_c = sum(0.5 * ulp * umax**k for k in range(coeffs.shape[1]))
        err_pow, e = 0.0, 0.0
        for k in range(2, coeffs.shape[1]):
            e = umax * e + ulp  # |trunc(p * u) - u^k| <= |u| |err(p)| + 1 ulp
            err_pow += (abs(coeffs[j, k]) + ulp) * e
        worst = max(worst, err_c + err_pow)
    return worst


class PlainApproxOps:
    """The exact fixed-point semantics (floor truncation, exact comparison)."""

    def const(self, value: np.ndarray) -> np.ndarray:
        return value

    def sign_thresholds(self, x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
        return (signed(x[None] - thresholds.reshape(-1, *([1] * x.ndim))) >= 0).astype(U64)

    def square(self, x: np.ndarray) -> np.ndarray:
        return x * x

    def mul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return x * y

    def trunc(self, x: np.ndarray, shift: int) -> np.ndarray:
        return arith_shift(x, shift)

    def relu(self, x: np.ndarray) -> np.ndarray:
        return np.where(signed(x) > 0, x, U64(0))
