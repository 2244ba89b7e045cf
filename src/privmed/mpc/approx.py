"""Smooth activations and softmax on shares: ``privmed.ir.approx.piecewise`` (a public
piecewise cubic, Sigmoid / Tanh / Erf / SiLU / GELU / exp) and ``privmed.ir.softmax`` with each
of their ops one protocol of ``privmed.mpc.protocols``, so the dealer serves them without any
code of its own.

Construction: the spline on comparison-selected intervals of SIRNN (Rathee et al., S&P 2021,
sec. 5) and CrypTen (Knott et al., NeurIPS 2021, supplementary material), with the interval's coefficients
selected by a public linear map of the comparison bits instead of a lookup table. For x at
scale f, K intervals (K - 1 knots) and degree d = 3:

1. b = [x >= t_j] for the K - 1 knots: one ``compare.sign_thresholds``, which opens x once
   and compares it with every knot (the knots are public), width ``bits`` from calibration.
2. Local: the interval's center M and coefficients C_0..C_d, linear in the bits.
3. u = x - M; u^2 = trunc(square(u)); u^3 = trunc(u^2 * u) (two Beaver products, two
   truncations).
4. y = C_0 2^f + sum_k C_k u^k: one Beaver product of the stacked (d, n) tensors.

Rounds: (2 + ceil(log2 m)) + 4 + 1, m = bits / 4 comparison chunks (10 for m = 6).
Bytes per element and party: 8 + (K - 1)(g / 4 + 1/8) (the comparisons; g AND gates in the
comparison tree, 7 for m = 6) + 14 (square and its truncation, which opens bits [f, 64) of
each share) + 22 (product and truncation) + 16 d (the final product) = 1.875 (K - 1) + 92 at
m = 6: measured on 2026-11-30 (data owner's bytes sent per element, a 4x32x32 input) Tanh
(12 knots) 115.0 B and Erf (11) 113.1 B (120 and 118 B with full openings and a separate
r >> f share; 197-207 B with a separate opening per knot). Dealer to the model owner:
8 (K - 1) + 2m + (K - 1)(g + 1) / 8 (comparisons) + 8 + 8 + 2 * 4 + 8 d bytes per element
(the two products' c, the two truncations' wrap bit and msb(r) at 16 bits, the final
product's c): measured 168.4 B (Tanh) and 159.4 B (Erf).
Error: the table's fit error (measured at fit time, <= 1e-4 for every shipped function over
the whole real line) plus ``privmed.ir.approx.fixed_point_error`` (3e-5 at f = 16) plus the
truncations' -1..+2 ulp, which the secure result adds to the reference's.

Security (semi-honest, non-colluding dealer): the composition of protocols each of whose
views is simulatable (``compare.sign_thresholds``, ``arith`` Beaver products, ``compare.truncate``), each
with fresh correlations under its own ``StreamKey``; nothing is opened but masked values, and
the table is public, so the composition is simulatable (sequential composition).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from privmed.ir.approx import piecewise
from privmed.ir.softmax import softmax
from privmed.mpc.protocols import Protocols


class SecureApproxOps:
    """``privmed.ir.approx.ApproxOps`` on shares (the dealer's recording walk included)."""

    def __init__(self, pr: Protocols, bits: int) -> None:
        self.pr, self.bits = pr, bits

    def const(self, value: np.ndarray) -> np.ndarray:
        return value if getattr(self.pr, "is_data_owner", False) else np.zeros_like(value)

    def sign_thresholds(self, x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
        return self.pr.sign_thresholds(np.ascontiguousarray(x), thresholds, self.bits)

    def square(self, x: np.ndarray) -> np.ndarray:
        return self.pr.square(np.ascontiguousarray(x))

    def mul(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return self.pr.multiply(np.ascontiguousarray(x), np.ascontiguousarray(y))

    def trunc(self, x: np.ndarray, shift: int) -> np.ndarray:
        return self.pr.truncate(np.ascontiguousarray(x), shift).reshape(x.shape)

    def relu(self, x: np.ndarray) -> np.ndarray:
        return self.pr.relu(np.ascontiguousarray(x), 0, self.bits, 0)[0].reshape(x.shape)


def secure_approx(pr: Protocols, x: np.ndarray, attrs: dict[str, Any], f: int) -> np.ndarray:
    """Shares of the node's piecewise cubic of x (scale f), at scale 2f."""
    return piecewise(SecureApproxOps(pr, attrs["bits"]), x, attrs, f)


def secure_softmax(pr: Protocols, x: np.ndarray, attrs: dict[str, Any], f: int) -> np.ndarray:
    """Shares of softmax along the node's axis, at scale 2f (``privmed.ir.softmax``): as in
    CrypTen (Knott et al., NeurIPS 2021, supplementary material), the row maximum by a tree of
    comparisons, exp(x - max), and 1/sum by Newton-Raphson, here with the exponential as a
    public piecewise cubic and the Newton start from sign bits of the sum.

    Protocols per row of length L: ceil(log2 L) ReLU layers (the max tree, L - 1 ReLUs), the
    exponential's piecewise cubic on L elements (8 knots, one shared opening; see above), one
    truncation, K = ceil(log2 L) threshold signs of the sum (one opening) and 4 Newton steps
    (2 products + 2 truncations each) on one value, the final product on L elements. Rounds:
    (ceil(log2 L) + 2)(2 + ceil(log2 m)) + 5 + 1 + 16 + 1; e.g. 53 for L = 16 and m = 7.
    Bytes per element and party (measured): 161 B for L = 16, 151 B for L = 64.
    Security: a composition of the simulatable protocols above, each with fresh correlations.
    """
    return softmax(SecureApproxOps(pr, attrs["bits"]), x, attrs, f)
