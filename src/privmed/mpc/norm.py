"""Secure instance / group normalisation: ``privmed.ir.norm.instance_norm`` run on
shares. Each op of the algorithm is one protocol (costs per element and party):

- trunc: ``compare.truncate`` (1 round, 8 B; on the N*C statistics and, if needed, squares);
- square / mul: ``arith`` Beaver products (1 round, 8 B per factor element);
- sign: ``compare.sign`` on N*C*K thresholds (2 + ceil(log2 m) rounds);
- gamma: ``linear.private_linear`` with the model owner's per-channel gamma (1 round).

Full-size work is one square and one product of the N*C*M activations (16 B each way per
element, 16 B from the dealer); everything else acts on N*C values. Rounds: about
9 + 6 * 3 (Newton) + 7 (signs) = 34 per normalisation layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from privmed.ir.norm import instance_norm
from privmed.mpc.protocols import Protocols

U64 = np.uint64


class SecureNormOps:
    """``privmed.ir.norm.NormOps`` on shares; ``gamma``/``beta`` are the model owner's (None
    elsewhere)."""

    def __init__(self, pr: Protocols, sign_bits: int, gamma: np.ndarray | None, beta: np.ndarray | None) -> None:
        self.pr, self.sign_bits, self._gamma, self._beta = pr, sign_bits, gamma, beta

    def const(self, value: np.ndarray) -> np.ndarray:
        return value if getattr(self.pr, "is_data_owner", False) else np.zeros_like(value)

    def trunc(self, x: np.ndarray, step: str, shift: int) -> np.ndarray:
        return self.pr.truncate(np.ascontiguousarray(x), shift)

    def square(self, x: np.ndarray, step: str) -> np.ndarray:
        return self.pr.square(np.ascontiguousarray(x))

    def mul(self, x: np.ndarray, y: np.ndarray, step: str) -> np.ndarray:
        return self.pr.multiply(np.ascontiguousarray(x), np.ascontiguousarray(y))

    def sign(self, x: np.ndarray, step: str) -> np.ndarray:
        return self.pr.sign(np.ascontiguousarray(x), self.sign_bits)

    def gamma(self, y: np.ndarray, step: str) -> np.ndarray:
        c = y.shape[1]
        return self.pr.linear(np.ascontiguousarray(y), "channel_scale", None, (c,), tuple(y.shape), self._gamma)

    def beta(self) -> np.ndarray | None:
        return self._beta


def secure_instance_norm(pr: Protocols, x: np.ndarray, attrs: dict[str, Any], f: int,
                         gamma: np.ndarray | None = None, beta: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    return instance_norm(SecureNormOps(pr, attrs["sign_bits"], gamma, beta), x, attrs, f)
