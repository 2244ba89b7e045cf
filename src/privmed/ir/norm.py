"""Instance normalisation in fixed point: the one algorithm that the reference executes on
values and the secure runtime executes on shares (``privmed.mpc.norm`` supplies the ops).

y = gamma * (x - mean) / sqrt(var + eps) + beta over the trailing axes of each (sample,
channel); GroupNorm exports as Reshape -> InstanceNormalization -> Reshape -> Mul -> Add and
runs through the same op. Steps, for x at scale f with M elements per channel:

1. mean = trunc(sum(x) * round(2^f / M)) (scale f); d = (x - mean) 2^pre, a public shift that
   the compiler picks from calibration so that small-variance channels keep enough bits of
   var at scale f (normalisation is scale-invariant: (d 2^p) / sqrt(var 4^p + eps 4^p) is
   the same value; eps is scaled with it).
2. var = trunc(trunc(sum(d^2)) * round(2^f / M)) + eps (the squares are truncated before the
   sum instead when M * max|d|^2 could approach 2^61).
3. Initial guess of 1/sqrt(var) from K sign bits b_k = [var >= 2^k], k = k_lo..k_hi:
   y0 = 2^(-(k* + 1/2)/2) for k* = max{k : var >= 2^k}, a public linear function of the bits;
   its relative error is at most 2^(1/4) - 1 = 19%.
4. Three Newton steps y <- y (3/2 - var y^2 / 2): relative error 19% -> 5.4% -> 0.44% ->
   3e-5 (e' = -1.5 e^2), then fixed-point rounding.
5. out = d * (gamma * y) + beta, at scale 2f (the next op truncates).

Limits (documented approximation): channels with var + eps < 2^k_lo = 2^-(f-2) start below
the true value and are not fully corrected by three steps; var above 2^k_hi (calibration
bound times 2^margin) would make Newton diverge, which the compiler's margin prevents.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from privmed.ring.fixed import U64, arith_shift, encode, signed

NEWTON_STEPS = 3


class NormOps(Protocol):
    def const(self, value: np.ndarray) -> np.ndarray: ...
    def trunc(self, x: np.ndarray, step: str, shift: int) -> np.ndarray: ...
    def square(self, x: np.ndarray, step: str) -> np.ndarray: ...
    def mul(self, x: np.ndarray, y: np.ndarray, step: str) -> np.ndarray: ...
    def sign(self, x: np.ndarray, step: str) -> np.ndarray: ...
    def gamma(self, y: np.ndarray, step: str) -> np.ndarray: ...
    def beta(self) -> np.ndarray | None: ...


def initial_guess_weights(k_lo: int, k_hi: int) -> tuple[float, np.ndarray]:
    """y0 = base + sum_k b_k * delta_k for sign bits b_k = [var >= 2^k]."""
    ks = np.arange(k_lo, k_hi + 1, dtype=np.float64)
    base = 2.0 ** (-(k_lo - 1 + 0.5) / 2)
    delta = 2.0 ** (-(ks + 0.5) / 2) - 2.0 ** (-(ks - 1 + 0.5) / 2)
    return base, delta


def instance_norm(ops: NormOps, x: np.ndarray, a: dict[str, Any], f: int) -> np.ndarray:
    n, c = x.shape[:2]
    m = int(np.prod(x.shape[2:]))
    x3 = x.reshape(n, c, m)
    inv_m = encode(np.array(1.0 / m), f)
    mean = ops.trunc(x3.sum(axis=2, keepdims=True, dtype=U64) * inv_m, "mu", f)
    d = (x3 - mean) << U64(a["pre"])
    d2 = ops.square(d, "sq")
    if a["sum_first"]:
        s2 = ops.trunc(d2.sum(axis=2, keepdims=True, dtype=U64), "s2t", f)
    else:
        s2 = ops.trunc(d2, "sqt", f).sum(axis=2, keepdims=True, dtype=U64)
    var = ops.trunc(s2 * inv_m, "var", f) + ops.const(encode(np.array(a["eps"] * 4.0 ** a["pre"]), f))
    base, delta = initial_guess_weights(a["k_lo"], a["k_hi"])
    thresholds = encode(2.0 ** np.arange(a["k_lo"], a["k_hi"] + 1, dtype=np.float64), f)
    bits = ops.sign(var[..., None] - ops.const(thresholds), "sign")  # (n, c, 1, K), scale 0
    y = ops.const(encode(np.array(base), f)) + (bits * encode(delta, f)).sum(axis=-1, dtype=U64)
    half3 = encode(np.array(1.5), f)
    for t in range(a["iters"]):
        y2 = ops.trunc(ops.square(y, f"i{t}y2"), f"i{t}y2t", f)
        half_vy2 = ops.trunc(ops.mul(var, y2, f"i{t}vy"), f"i{t}vyt", f + 1)
        y = ops.trunc(ops.mul(y, ops.const(half3) - half_vy2, f"i{t}yt"), f"i{t}ytt", f)
    if a["affine"]:
        y = ops.trunc(ops.gamma(y, "gamma"), "gammat", f)
    out = ops.mul(d, y, "out")
    beta = ops.beta()
    if beta is not None:
        out = out + beta
    return out.reshape(x.shape)


class PlainNormOps:
    """The exact fixed-point semantics (floor truncation, exact sign)."""

    def __init__(self, gamma: np.ndarray | None, beta: np.ndarray | None) -> None:
        self._gamma = gamma
        self._beta = beta

    def const(self, value: np.ndarray) -> np.ndarray:
        return value

    def trunc(self, x: np.ndarray, step: str, shift: int) -> np.ndarray:
        return arith_shift(x, shift)

    def square(self, x: np.ndarray, step: str) -> np.ndarray:
        return x * x

    def mul(self, x: np.ndarray, y: np.ndarray, step: str) -> np.ndarray:
        return x * y

    def sign(self, x: np.ndarray, step: str) -> np.ndarray:
        return (signed(x) >= 0).astype(U64)

    def gamma(self, y: np.ndarray, step: str) -> np.ndarray:
        assert self._gamma is not None
        return y * self._gamma.reshape(1, -1, 1)

    def beta(self) -> np.ndarray | None:
        return self._beta
