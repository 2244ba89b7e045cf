"""The IR shared by the protocols, the reference executor, the compiler and the runtime.

A ``Plan`` is public: the architecture only (op types, shapes, per-op attributes, the
fixed-point scale and the integer comparison widths). It is what the model owner sends to the
data owner and the dealer, as canonical JSON, and what ``privmed.ir.check`` validates on
receipt. Nothing measured on data or weights travels in it: the compiler's calibration report
(bounds, headroom) stays with the model owner in ``Plan.report``, which ``to_json`` leaves out.
The ``PrivateWeights`` (weights and biases of every private linear node, ring-encoded) never
leave the model owner.

Fields that depend on the weights and are public all the same, because the protocols need
them: ``frac_bits``, ``ring_bits`` (the shares' ring, 40-64) and the integer comparison widths (``bits`` of relu / leaky_relu / maxpool;
``k_hi``, ``sign_bits``, ``sum_first`` and ``pre`` of instnorm; ``bits`` of approx). Each is a small integer (a handful of
bits of information per layer); ``tests/protocol/test_hostile_vendor.py`` checks that two
weight sets of one architecture give plans that differ only there. One more weight-dependent
bit per BatchNorm in front of a ReLU: whether its scales were all positive and folded into the
next layer (an ``upscale`` and a ``bias`` node instead of a ``channel_scale`` linear node,
``privmed.compiler.foldscale``).

Ops (``Node.op``) and their semantics on a secret tensor x at scale ``s`` (fractional bits):

============== ==================================================================== ============
op             meaning                                                              protocol
============== ==================================================================== ============
input          the data owner's tensor, encoded at scale f                          local
linear         L(W, x) + b with private W (scale f) and b (scale s+f); out s+f      Beaver, 1 rd
bias           x + b with private b (scale s)                                       local (P1)
relu           ReLU(x >> shift)                                                     compare
prelu          t = x >> shift; ReLU(t) 2^f + a (t - ReLU(t)), private a (scale f)    compare+Beaver
trunc          x >> shift                                                           1 round
maxpool        max over windows (pairwise tree of ReLUs)                            compare
avgpool        window sum times public 1/count (scale s -> s+f)                     local
instnorm       instance norm (+ private gamma, beta) over trailing axes; out 2f     see mpc.norm
upscale        x * 2^shift                                                          local
add            x + y (same scale)                                                   local
mul            x * y, both secret, y broadcast over x (scale f each -> 2f)          Beaver, 1 rd
softmax        along an axis (attention): max tree, exp cubic, Newton 1/S; f -> 2f   see ir.softmax
einsum         einsum of two secret tensors (attention's Q K^T, P V); f each -> 2f  Beaver, 1 rd
approx         public piecewise cubic of x (Sigmoid/Tanh/Erf/SiLU/GELU; table in    compare+
               the attrs, ``privmed.ir.approx``); scale f -> 2f                     Beaver
concat         along axis                                                           local
reshape        to shape (per sample, batch dim prepended)                           local
transpose      perm                                                                 local
pad            ONNX Pad (constant value encoded at scale s, added by P0)            local
resize         nearest-neighbour gather                                             local
interp         linear resize: sum of gathers times public weights (scale s -> s+f)  local
slice          ONNX Slice with constant bounds                                      local
output         reveal to the data owner, then post-processing in clear              1 round
============== ==================================================================== ============
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PLAN_VERSION = 3


@dataclass
class Node:
    id: str
    op: str
    inputs: list[str]
    shape: list[int]  # per-sample output shape (batch dim excluded)
    scale: int  # fractional bits of the output
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "inputs": list(self.inputs), "shape": list(self.shape),
                "scale": self.scale, "attrs": self.attrs}


@dataclass
class Plan:
    """Public description of the computation."""

    nodes: list[Node]
    frac_bits: int
    input_name: str
    input_shape: list[int]  # per sample
    output_name: str
    model_name: str = ""
    version: int = PLAN_VERSION
    # The shares' ring Z_2^ring_bits (40..64): the compiler's bound on every value that meets a
    # comparison, a truncation or the output, |x| < 2^(ring_bits - 2), with the margin.
    ring_bits: int = 64
    # The compiler's calibration report (bounds, headroom): model owner only, never sent.
    report: dict[str, Any] = field(default_factory=dict, compare=False)

    def public_dict(self) -> dict[str, Any]:
        """What is sent: the architecture (``report`` is left out)."""
        return {
            "version": self.version, "model_name": self.model_name, "frac_bits": self.frac_bits, "ring_bits": self.ring_bits,
            "input_name": self.input_name, "input_shape": list(self.input_shape),
            "output_name": self.output_name, "nodes": [n.to_dict() for n in self.nodes],
        }

    def to_json(self) -> str:
        """Canonical JSON (sorted keys, no spaces): the bytes that are sent and fingerprinted."""
        return json.dumps(self.public_dict(), sort_keys=True, separators=(",", ":"), allow_nan=False)

    def fingerprint(self) -> str:
        """SHA-256 of the canonical JSON, hex: what a hospital pins with ``--expect-plan``."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse a plan *without* checking it; a plan from a peer goes through
        ``privmed.ir.check.parse_plan`` instead."""
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
