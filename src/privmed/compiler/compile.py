"""The compiler pipeline: ONNX file -> (public Plan, PrivateWeights)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privmed.compiler import calibrate, onnx_front
from privmed.compiler.foldscale import (
    drop_round_trips,
    fold_positive_scales,
    lift_concats,
    maxpool_before_relu,
    pool_before_pointwise_conv,
)
from privmed.compiler.lower import check_supported
from privmed.errors import ModelError
from privmed.ir.check import PlanError, check_plan
from privmed.ir.plan import Plan, PrivateWeights

DEFAULT_FRAC_BITS = 16
DEFAULT_MARGIN_BITS = 4


def default_calibration(shape: list[int], seed: int = 0) -> np.ndarray:
    """A standard-normal calibration input (used when the model owner gives none)."""
    return np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float64)


def compile_model(
    path: Path,
    *,
    calibration: np.ndarray | None = None,
    frac_bits: int | None = None,
    margin_bits: int = DEFAULT_MARGIN_BITS,
    input_shape: list[int] | None = None,
    ring_bits: int | None = None,
) -> tuple[Plan, PrivateWeights]:
    """Compile an ONNX model for secure inference.

    ``ring_bits`` None picks the smallest ring the calibrated bounds allow
    (``calibrate.choose_ring_bits``); 64 forces Z_2^64.

    Raises ModelError (one line, listing all unsupported ops) on a bad model.
    """
    graph = onnx_front.load(Path(path), input_shape)
    low = check_supported(graph, Path(path))  # the lowering, done once
    folded = fold_positive_scales(low.nodes, low.float_weight, low.float_bias, low.nodes[-1].id)
    round_trips = drop_round_trips(low.nodes, low.nodes[-1].id)
    lifted = lift_concats(low.nodes, low.nodes[-1].id)
    pools_first = maxpool_before_relu(low.nodes, low.nodes[-1].id)
    pooled_convs = pool_before_pointwise_conv(low.nodes, low.nodes[-1].id)
    weights = PrivateWeights(float_weight=low.float_weight, float_bias=low.float_bias)
    plan = Plan(low.nodes, 0, graph.input_name, list(graph.input_shape), low.nodes[-1].id, graph.name)
    cal = default_calibration(plan.input_shape) if calibration is None else np.asarray(calibration, dtype=np.float64)
    if cal.ndim == len(plan.input_shape):
        cal = cal[None]
    bounds, extras = calibrate.float_bounds(plan, weights, cal)  # scales still multiples: float ignores them
    f, limiting = calibrate.choose_frac_bits(plan.nodes, bounds, margin_bits, frac_bits or DEFAULT_FRAC_BITS)
    report = calibrate.finalize(plan.nodes, bounds, f, margin_bits, extras)
    plan.frac_bits = f
    auto_ring, ring_need = calibrate.choose_ring_bits(plan.nodes, bounds, margin_bits)
    if ring_bits is not None and ring_bits < ring_need:
        raise ModelError(f"{path}: ring_bits {ring_bits} is too small: the calibrated values need {ring_need} bits")
    plan.ring_bits = auto_ring if ring_bits is None else ring_bits
    calibrate.encode_weights(plan.nodes, weights, f)
    report.update(
        frac_bits=f,
        ring_bits=plan.ring_bits,
        ring_bits_needed=ring_need,
        folded_scales=folded,
        dropped_round_trips=round_trips,
        lifted_concats=lifted,
        maxpool_before_relu=pools_first,
        pool_before_pointwise_conv=pooled_convs,
        margin_bits=margin_bits,
        calibration="given" if calibration is not None else "standard normal (seed 0)",
        nodes=len(plan.nodes),
        linear_layers=sum(n.op == "linear" for n in plan.nodes),
        opset=graph.opset,
    )
    if limiting and f < (frac_bits or DEFAULT_FRAC_BITS):
        report["frac_bits_limited_by"] = limiting
    plan.report = report
    try:
        check_plan(plan)  # the receivers will run the same check: fail here, at the vendor, first
    except PlanError as exc:
        raise ModelError(f"{path}: the compiled plan breaks a plan rule ({exc})") from None
    return plan, weights
