"""Float and fixed-point plaintext backends for ``privmed.ir.walk.run_plan``."""

from __future__ import annotations

from typing import Any

import numpy as np

from privmed.ir.approx import PlainApproxOps, exact, piecewise
from privmed.ir.ops import (
    avg_divisor,
    batched_equation,
    conv_spec,
    interp_taps,
    interp_weights,
    postprocess,
)
from privmed.ir.plan import Node, Plan, PrivateWeights
from privmed.ir.softmax import softmax
from privmed.ring import layout
from privmed.ring.fixed import U64, arith_shift, decode, encode, signed
from privmed.ring.linalg import linear


class FloatBackend:
    """float64 semantics of the plan (what onnxruntime computes, up to float rounding)."""

    def __init__(self, weights: PrivateWeights, x: np.ndarray, dtype: type = np.float64) -> None:
        self.w = weights
        self.x: np.ndarray = np.asarray(x, dtype=dtype)
        self.stats: dict[str, dict[str, float]] = {}  # per-node extras for calibration

    def input(self, node: Node, batch: int) -> np.ndarray:
        return self.x

    def linear(self, node: Node, x: np.ndarray) -> np.ndarray:
        kind = node.attrs["kind"]
        w = self.w.float_weight[node.id].astype(x.dtype, copy=False)
        y = linear(kind, conv_spec(node.attrs) if "spec" in node.attrs else None, w, x)
        b = self.w.float_bias.get(node.id)
        return y if b is None else y + b.astype(x.dtype, copy=False)

    def bias(self, node: Node, x: np.ndarray) -> np.ndarray:
        return x + self.w.float_bias[node.id]

    def relu(self, node: Node, x: np.ndarray) -> np.ndarray:
        return np.maximum(x, 0.0)

    def leaky_relu(self, node: Node, x: np.ndarray) -> np.ndarray:
        return np.where(x > 0, x, node.attrs["alpha"] * x)

    def prelu(self, node: Node, x: np.ndarray) -> np.ndarray:
        slope = self.w.float_weight[node.id].astype(x.dtype, copy=False).reshape((-1,) + (1,) * (x.ndim - 2))
        return np.where(x > 0, x, slope * x)

    def trunc(self, node: Node, x: np.ndarray) -> np.ndarray:
        return x

    upscale = trunc

    def maxpool(self, node: Node, x: np.ndarray) -> np.ndarray:
        a = node.attrs
        return layout.windows(x, a["kernel"], a["strides"], a["pads"], a["dilations"], pad_mode="edge").max(axis=-1)

    def avgpool(self, node: Node, x: np.ndarray) -> np.ndarray:
        a = node.attrs
        return layout.pool_sum(x, a["kernel"], a["strides"], a["pads"]) / avg_divisor(node, x.shape)

    def pad_value(self, node: Node, dtype: np.dtype) -> Any:
        return node.attrs["value"]

    def interp(self, node: Node, x: np.ndarray) -> np.ndarray:
        return layout.interpolate(x, interp_taps(node.attrs), [g.astype(x.dtype) for g in interp_weights(node.attrs)])

    def instnorm(self, node: Node, x: np.ndarray) -> np.ndarray:
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        d = x3 - x3.mean(axis=2, keepdims=True)
        var = (d * d).mean(axis=2, keepdims=True)
        self.stats[node.id] = {"var_max": float(var.max()), "var_min": float(var.min()), "d_max": float(np.abs(d).max())}
        y = d / np.sqrt(var + node.attrs["eps"])
        if node.id in self.w.float_weight:
            y = y * self.w.float_weight[node.id].reshape(1, -1, 1)
        if node.id in self.w.float_bias:
            y = y + self.w.float_bias[node.id]
        return y.reshape(x.shape)

    def approx(self, node: Node, x: np.ndarray) -> np.ndarray:
        return exact(node.attrs["fn"])(x).astype(x.dtype, copy=False)

    def softmax(self, node: Node, x: np.ndarray) -> np.ndarray:
        return postprocess(x, {"kind": "softmax", "axis": node.attrs["axis"] + 1})

    def mul(self, node: Node, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return x * y

    def einsum(self, node: Node, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.einsum(batched_equation(node.attrs["equation"]), x, y)

    def output(self, node: Node, x: np.ndarray) -> np.ndarray:
        return x


def leaky_combine(relu_t: np.ndarray, t: np.ndarray, alpha: float, f: int) -> np.ndarray:
    """LeakyReLU from r = ReLU(t) and t: r * 2^f + (t - r) * alpha (scale grows by f); linear
    in (r, t), so it is the same on values and on shares."""
    return relu_t * U64(1 << f) + (t - relu_t) * encode(np.array(alpha), f)


def prelu_combine(relu_t: np.ndarray, slope_times_negative: np.ndarray, f: int) -> np.ndarray:
    """PReLU from r = ReLU(t) and a * (t - r) (the private per-channel product, scale 2f):
    r * 2^f + a (t - r), at scale 2f."""
    return relu_t * U64(1 << f) + slope_times_negative


class RingOps:
    """The public ops of a plan on Z_2^64 values, the same on values and on shares (linear
    with public coefficients): shared by the fixed-point reference and the secure backend."""

    def __init__(self, frac_bits: int) -> None:
        self.f = frac_bits

    def upscale(self, node: Node, x: np.ndarray) -> np.ndarray:
        return x << U64(node.attrs["shift"])

    def avgpool(self, node: Node, x: np.ndarray) -> np.ndarray:
        a = node.attrs
        s = layout.pool_sum(x, a["kernel"], a["strides"], a["pads"])
        return s * encode(1.0 / np.asarray(avg_divisor(node, x.shape)), self.f)

    def interp(self, node: Node, x: np.ndarray) -> np.ndarray:
        """Linear resize: public weights at scale f (scale s -> s + f; exact for the dyadic
        weights of integer scale factors)."""
        return layout.interpolate(x, interp_taps(node.attrs), [encode(g, self.f) for g in interp_weights(node.attrs)])


class FixedBackend(RingOps):
    """Exact fixed-point semantics in Z_2^64 (floor truncation, exact comparisons)."""

    def __init__(self, plan: Plan, weights: PrivateWeights, x: np.ndarray) -> None:
        super().__init__(plan.frac_bits)
        self.plan = plan
        self.w = weights
        self.x = encode(x, plan.frac_bits)
        self.scales = {n.id: n.scale for n in plan.nodes}

    def input(self, node: Node, batch: int) -> np.ndarray:
        return self.x

    def linear(self, node: Node, x: np.ndarray) -> np.ndarray:
        y = linear(node.attrs["kind"], conv_spec(node.attrs) if "spec" in node.attrs else None, self.w.weight[node.id], x)
        b = self.w.bias.get(node.id)
        return y if b is None else y + b

    def bias(self, node: Node, x: np.ndarray) -> np.ndarray:
        return x + self.w.bias[node.id]

    def relu(self, node: Node, x: np.ndarray) -> np.ndarray:
        t = arith_shift(x, node.attrs["shift"])
        return np.where(signed(t) > 0, t, U64(0))

    def leaky_relu(self, node: Node, x: np.ndarray) -> np.ndarray:
        t = arith_shift(x, node.attrs["shift"])
        return leaky_combine(np.where(signed(t) > 0, t, U64(0)), t, node.attrs["alpha"], self.f)

    def prelu(self, node: Node, x: np.ndarray) -> np.ndarray:
        t = arith_shift(x, node.attrs["shift"])
        r = np.where(signed(t) > 0, t, U64(0))
        return prelu_combine(r, linear("channel_scale", None, self.w.weight[node.id], t - r), self.f)

    def trunc(self, node: Node, x: np.ndarray) -> np.ndarray:
        return arith_shift(x, node.attrs["shift"])

    def maxpool(self, node: Node, x: np.ndarray) -> np.ndarray:
        a = node.attrs
        w = layout.windows(signed(x), a["kernel"], a["strides"], a["pads"], a["dilations"], pad_mode="edge")
        return w.max(axis=-1).view(U64)

    def pad_value(self, node: Node, dtype: np.dtype) -> Any:
        return encode(np.array(node.attrs["value"]), self.scales[node.id])

    def instnorm(self, node: Node, x: np.ndarray) -> np.ndarray:
        from privmed.ir.norm import PlainNormOps, instance_norm

        ops = PlainNormOps(self.w.weight.get(node.id), self.w.bias.get(node.id))
        return instance_norm(ops, x, node.attrs, self.f)

    def approx(self, node: Node, x: np.ndarray) -> np.ndarray:
        return piecewise(PlainApproxOps(), x, node.attrs, self.f)

    def softmax(self, node: Node, x: np.ndarray) -> np.ndarray:
        return softmax(PlainApproxOps(), x, node.attrs, self.f)

    def mul(self, node: Node, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return x * y

    def einsum(self, node: Node, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.einsum(batched_equation(node.attrs["equation"]), x, y)

    def output(self, node: Node, x: np.ndarray) -> np.ndarray:
        return decode(x, node.scale)
