"""Secure instance / group normalisation: ``privmed.ir.norm.instance_norm`` run on
shares. Each op of the algorithm is one protocol (costs per element and party):

- trunc: ``nonlinear.truncate`` (1 round, 8 B; on the N*C statistics and, if needed, squares);
- square / mul: ``arith`` Beaver products (1 round, 8 B per factor element);
- sign: ``nonlinear.sign`` on N*C*K thresholds (2 + ceil(log2 m) rounds);
- gamma: ``linear.private_linear`` with the model owner's per-channel gamma (1 round).

Full-size work is one square and one product of the N*C*M activations (16 B each way per
element, 16 B from the dealer); everything else acts on N*C values. Rounds: about
9 + 6 * 3 (Newton) + 7 (signs) = 34 per normalisation layer.
"""

from __future__ import annotations

import numpy as np

from privmed.ir.plan import Node, PrivateWeights
from privmed.mpc import arith, linear, nonlinear
from privmed.mpc.correlated import Request
from privmed.mpc.party import Party
from privmed.ir.norm import instance_norm

U64 = np.uint64


class SecureNormOps:
    def __init__(self, p: Party, node: Node, reqs: dict[str, Request], pre: str, weights: PrivateWeights | None, masked: dict[str, np.ndarray]) -> None:
        self.p, self.node, self.reqs, self.pre, self.w, self.masked = p, node, reqs, pre, weights, masked

    def _req(self, step: str) -> Request:
        return self.reqs[f"{self.pre}/{step}"]

    def const(self, value: np.ndarray) -> np.ndarray:
        return value if self.p.is_data_owner else np.zeros_like(value)

    def trunc(self, x: np.ndarray, step: str, shift: int) -> np.ndarray:
        return nonlinear.truncate(self.p, self._req(step), np.ascontiguousarray(x))

    def square(self, x: np.ndarray, step: str) -> np.ndarray:
        return arith.square(self.p, self._req(step), np.ascontiguousarray(x))

    def mul(self, x: np.ndarray, y: np.ndarray, step: str) -> np.ndarray:
        return arith.multiply(self.p, self._req(step), np.ascontiguousarray(x), np.ascontiguousarray(y))

    def sign(self, x: np.ndarray, step: str) -> np.ndarray:
        return nonlinear.sign(self.p, self._req(step), np.ascontiguousarray(x))

    def gamma(self, y: np.ndarray, step: str) -> np.ndarray:
        req = self._req(step)
        if self.p.is_data_owner:
            return linear.private_linear(self.p, req, y, masked_weights=self.masked)
        assert self.w is not None
        return linear.private_linear(self.p, req, y, self.w.weight[self.node.id], None, None, self.masked)

    def beta(self) -> np.ndarray | None:
        if self.p.is_data_owner or self.w is None:
            return None
        return self.w.bias.get(self.node.id)


def secure_instance_norm(p: Party, node: Node, x: np.ndarray, reqs: dict[str, Request], pre: str, weights: PrivateWeights | None, masked: dict[str, np.ndarray], f: int) -> np.ndarray:
    return instance_norm(SecureNormOps(p, node, reqs, pre, weights, masked), x, node.attrs, f)
