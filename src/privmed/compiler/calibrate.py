"""Choose the fixed-point scale and comparison widths from a calibration input.

For every node we record the largest |value| seen in float on the calibration input (bound B).
Z_2^64 holds values up to about 2^62 safely (``privmed.mpc.compare`` needs
|x| < 2^(l-2) - 2^(s+1) in Z_2^l), so with a safety margin of ``margin`` bits (a factor
2^margin over calibration) the fractional bits f must satisfy log2(B) + margin + k f <= 61 for
every node at scale k f; the plan's ring Z_2^l is then the smallest that holds every value with
the same margin (``choose_ring_bits``). The comparison width of a
ReLU / max is l = ceil(log2(B * 2^scale)) + margin bits: an input beyond 2^l would get the wrong
sign, so the margin is the worst-case bound reported to the user.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from privmed.errors import ModelError
from privmed.ir.plan import Node, Plan, PrivateWeights
from privmed.ir.walk import run_plan
from privmed.reference.executors import FloatBackend

CHUNK_BITS = 4
MAX_FRAC_BITS = 20


def float_bounds(plan: Plan, weights: PrivateWeights, x: np.ndarray) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """max |value| of every node's output on input x (float execution), and op extras."""
    backend = FloatBackend(weights, x, dtype=np.float32)  # bounds only: float32 is ample, 2x faster
    _, values = run_plan(plan, backend, batch=x.shape[0], keep=True)
    return {nid: float(np.max(np.abs(v))) if v.size else 0.0 for nid, v in values.items()}, backend.stats


def _log2(v: float) -> float:
    return math.log2(max(v, 2.0**-30))


def choose_frac_bits(nodes: list[Node], bounds: dict[str, float], margin: int, target: int) -> tuple[int, str]:
    limit, worst = target, ""
    for n in nodes:
        if n.op == "output":
            continue
        fmax = math.floor((61 - margin - _log2(bounds.get(n.id, 0.0))) / n.scale)
        if fmax < limit:
            limit, worst = fmax, n.id
    if limit < 6:
        raise ModelError(f"activations too large for 64-bit fixed point at node {worst} (bound {bounds.get(worst):.3g}); rescale the model input")
    return min(limit, MAX_FRAC_BITS), worst


def _width(bound_scaled: float, margin: int, drop: int) -> int:
    need = math.ceil(_log2(bound_scaled + 1.0)) + margin
    width = drop + CHUNK_BITS * max(1, math.ceil((need - drop) / CHUNK_BITS))
    if width > 60:
        raise ModelError(f"comparison needs {width} bits (> 60); activations are too large for the chosen scale")
    return width


def _instnorm_params(n: Node, extra: dict[str, float], f: int, margin: int) -> None:
    """Pre-shift, threshold range, comparison width and summation order of a secure instance
    norm. The pre-shift p brings the smallest calibrated channel variance to at least 2^-6
    (about f - 6 significant bits of var at scale f) without taking the largest above 2^8
    (1/sqrt(var) keeps f - 4 bits) or the squares' sum near the ring's limit."""
    m = int(np.prod(n.shape[1:]))
    var_min, var_max, d_max = extra.get("var_min", 1.0), extra.get("var_max", 1.0), extra.get("d_max", 1.0)
    room = math.floor((61 - margin - math.log2(m) - 2 * f - 2 * _log2(d_max)) / 2)  # squares' sum stays < 2^61
    pre = max(0, min(math.ceil((-6 - _log2(var_min)) / 2), math.floor((8 - _log2(var_max)) / 2), room))
    var_top = (var_max + n.attrs["eps"]) * 4.0**pre
    k_hi = math.ceil(_log2(var_top)) + margin
    n.attrs.update(
        pre=pre,
        frac_bits=f,
        k_lo=-(f - 2),
        k_hi=k_hi,
        iters=3,
        sign_bits=_width(2.0 ** (k_hi + 1 + f), 0, 0),
        sum_first=bool(math.log2(m) + 2 * (_log2(d_max) + pre) + 2 * f + margin < 61),
    )


def finalize(nodes: list[Node], bounds: dict[str, float], f: int, margin: int, extras: dict[str, dict[str, float]] | None = None) -> dict[str, Any]:
    """Turn scale multiples into bits and set comparison widths. Returns report numbers."""
    by_id = {n.id: n for n in nodes}
    compared = 0
    headroom: tuple[float, str] = (64.0, "")
    for n in nodes:
        k_in = by_id[n.inputs[0]].scale if n.inputs else 1
        for key in ("shift_k",):
            if key in n.attrs:
                n.attrs["shift"] = n.attrs.pop(key) * f
        in_bound = bounds.get(n.inputs[0], 0.0) if n.inputs else 0.0
        if n.op in ("relu", "leaky_relu", "prelu"):
            n.attrs["bits"] = _width(in_bound * 2.0 ** (k_in * f), margin, n.attrs["shift"])
            n.attrs["drop"] = n.attrs["shift"]
            compared += int(np.prod(n.shape))
        elif n.op == "maxpool":  # above scale f (``foldscale.maxpool_before_relu``) only bits >= f compare
            n.attrs["drop"] = (k_in - 1) * f
            n.attrs["bits"] = _width(2 * in_bound * 2.0 ** (k_in * f), margin, n.attrs["drop"])
            compared += int(np.prod(n.shape)) * (int(np.prod(n.attrs["kernel"])) - 1)
        elif n.op == "softmax":  # max tree: x_i - x_j; knots: z - t_j; 1/S guess: S - 2^k, S <= L
            length = n.shape[n.attrs["axis"]]
            reach = max(2 * in_bound + max(abs(t) for t in n.attrs["knots"]), 4.0 * length)
            n.attrs["bits"] = _width(reach * 2.0 ** (k_in * f), margin, 0)
            compared += int(np.prod(n.shape)) * (len(n.attrs["knots"]) + 1)
        elif n.op == "approx":  # the knot comparisons see x - t_j
            reach = in_bound + max(abs(t) for t in n.attrs["knots"])
            n.attrs["bits"] = _width(reach * 2.0 ** (k_in * f), margin, 0)
            compared += int(np.prod(n.shape)) * len(n.attrs["knots"])
        elif n.op == "instnorm":
            _instnorm_params(n, (extras or {}).get(n.id, {}), f, margin)
    for n in nodes:
        n.scale = n.scale * f
        if n.op != "output":
            room = 62 - (_log2(bounds.get(n.id, 0.0)) + n.scale)
            if room < headroom[0]:
                headroom = (room, n.id)
    return {"comparisons": compared, "headroom_bits": round(headroom[0], 1), "headroom_node": headroom[1]}


RING_CHOICES = (40, 44, 48, 56, 64)  # 5 or 6 bytes on the wire; <= 44 bits: two 22-bit GEMM limbs


def choose_ring_bits(nodes: list[Node], bounds: dict[str, float], margin: int) -> tuple[int, int]:
    """(ring bits l, bits needed): the smallest of ``RING_CHOICES`` with |x| < 2^(l - 3) for
    every node's value x at its scale (calibration bound times 2^margin; the truncation's
    contract is |x| < 2^(l-2) - 2^(s+1), ``mpc.compare`` step 2, and the output is decoded
    from l bits) and every comparison width <= l - 3. Plans with
    norms, polynomials or softmax keep Z_2^64 (their internal sums and powers are bounded for
    it); so does a plan that needs more than 56 bits. Call after ``finalize``."""
    need = 0
    for n in nodes:
        if n.op in ("instnorm", "approx", "softmax"):
            return 64, 64
        if n.op != "output":
            need = max(need, math.ceil(_log2(bounds.get(n.id, 0.0) * 2.0**n.scale + 1.0)) + margin + 3)
        if isinstance(n.attrs.get("bits"), int):
            need = max(need, n.attrs["bits"] + 3)
    return next(r for r in RING_CHOICES if r >= need), need


def encode_weights(nodes: list[Node], weights: PrivateWeights, f: int) -> None:
    from privmed.ring.fixed import encode

    for n in nodes:
        if n.id in weights.float_weight:
            w = weights.float_weight[n.id]
            wq = encode(w, f)
            weights.weight[n.id] = wq
            weights.weight_bits[n.id] = int(math.ceil(math.log2(float(np.max(np.abs(wq.view(np.int64)))) + 2))) + 1
        if n.id in weights.float_bias:
            weights.bias[n.id] = encode(weights.float_bias[n.id], n.scale)
