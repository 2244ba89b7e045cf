"""The IR shared by compiler, reference executor and secure runtime.

A ``Plan`` is public: the architecture (op types, shapes, fixed-point scales, comparison
widths). It is what the model owner sends to the data owner and dealer, as JSON. The
``PrivateWeights`` (weights and biases of every private linear node, ring-encoded) never leave
the model owner.

Ops (``Node.op``) and their semantics on a secret tensor x at scale ``s`` (fractional bits):

============== ==================================================================== ============
op             meaning                                                              protocol
============== ==================================================================== ============
input          the data owner's tensor, encoded at scale f                          local
linear         L(W, x) + b with private W (scale f) and b (scale s+f); out s+f      Beaver, 1 rd
bias           x + b with private b (scale s)                                       local (P1)
relu           ReLU(x >> shift)                                                     compare
trunc          x >> shift                                                           1 round
maxpool        max over windows (pairwise tree of ReLUs)                            compare
avgpool        window sum times public 1/count (scale s -> s+f)                     local
instnorm       instance norm (+ private gamma, beta) over trailing axes; out 2f     see mpc.norm
upscale        x * 2^shift                                                          local
add            x + y (same scale)                                                   local
concat         along axis                                                           local
reshape        to shape (per sample, batch dim prepended)                           local
transpose      perm                                                                 local
pad            ONNX Pad (constant value encoded at scale s, added by P0)            local
resize         nearest-neighbour gather                                             local
slice          ONNX Slice with constant bounds                                      local
scale_public   x * round(c * 2^f) (public constant c); out s+f                      local
output         reveal to the data owner, then post-processing in clear              1 round
============== ==================================================================== ============
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

PLAN_VERSION = 1


@dataclass
class Node:
    id: str
    op: str
    inputs: list[str]
    shape: list[int]  # per-sample output shape (batch dim excluded)
    scale: int  # fractional bits of the output
    attrs: dict[str, Any] = field(default_factory=dict)
    bound: float = 0.0  # max |value| seen at calibration (real units)


@dataclass
class Plan:
    """Public description of the computation."""

    nodes: list[Node]
    frac_bits: int
    input_name: str
    input_shape: list[int]  # per sample
    output_name: str
    model_name: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        raw = json.loads(text)
        if raw.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {raw.get('version')}, expected {PLAN_VERSION}")
        raw["nodes"] = [Node(**n) for n in raw["nodes"]]
        return cls(**raw)

    def node(self, node_id: str) -> Node:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise KeyError(node_id)


@dataclass
class PrivateWeights:
    """Model owner's secrets: per linear/bias node, ring-encoded weight and bias."""

    weight: dict[str, np.ndarray] = field(default_factory=dict)  # uint64 (two's complement)
    bias: dict[str, np.ndarray] = field(default_factory=dict)  # uint64 at the node's output scale
    weight_bits: dict[str, int] = field(default_factory=dict)  # |W| < 2^bits (for the limb split)
    float_weight: dict[str, np.ndarray] = field(default_factory=dict)  # for calibration only
    float_bias: dict[str, np.ndarray] = field(default_factory=dict)
