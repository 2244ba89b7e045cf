"""LayerNormalization and GroupNormalization: the instance-norm protocol over a public
reshape to (groups, elements per group), then the private affine; vs onnxruntime.

Tolerance: the instance norm's (test_ops.test_instance_normalization: rtol 3e-3 + 2e-3).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from privmed.compiler.compile import compile_model
from tests.protocol.harness import run_three
from tests.protocol.onnx_models import build, rand

H = helper.make_node


def _secure_and_onnxruntime(path: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[str]]:
    plan, weights = compile_model(path, calibration=x)
    secure, _ = run_three(plan, weights, x.astype(np.float64))
    onnx_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    return secure, onnx_out, [n.op for n in plan.nodes]


def test_torch_layernorm_over_token_features(tmp_path: Path) -> None:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)).eval()
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.3, 0.3)
    x = torch.randn(1, 5, 6)  # 5 tokens of 6 features
    path = tmp_path / "ln.onnx"
    torch.onnx.export(net, (x,), str(path), opset_version=17, dynamo=False, input_names=["x"])
    secure, onnx_out, ops = _secure_and_onnxruntime(path, x.numpy())
    assert ops.count("instnorm") == 1 and ops.count("transpose") == 2  # the affine runs per feature
    np.testing.assert_allclose(secure, onnx_out, rtol=3e-3, atol=2e-3)


@pytest.mark.parametrize("opset,per", [(18, "group"), (21, "channel")])
def test_onnx_group_normalization(tmp_path: Path, opset: int, per: str) -> None:
    rng = np.random.default_rng(5)
    c, g = 6, 3
    n = g if per == "group" else c
    inits = {"w": rand(rng, c, 2, 3, 3), "s": rng.uniform(0.5, 1.5, n).astype(np.float32), "b": rng.normal(0, 0.3, n).astype(np.float32)}
    nodes = [H("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), H("GroupNormalization", ["c", "s", "b"], ["y"], num_groups=g, epsilon=1e-5)]
    path = build(tmp_path / "gn.onnx", nodes, inits, [1, 2, 5, 6], opset=opset)
    secure, onnx_out, ops = _secure_and_onnxruntime(path, rand(rng, 1, 2, 5, 6, scale=1.0))
    assert ops.count("instnorm") == 1
    np.testing.assert_allclose(secure, onnx_out, rtol=3e-3, atol=2e-3)


@pytest.mark.parametrize("affine", [True, False])
def test_layernorm_exported_before_opset_17_is_fused(tmp_path: Path, affine: bool) -> None:
    """torch at opset 14 writes LayerNorm as ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div
    (then Mul, Add): one LayerNormalization after the front end, same bound as above."""
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8, elementwise_affine=affine), torch.nn.Linear(8, 3)).eval()
    if affine:
        with torch.no_grad():
            net[1].weight.uniform_(0.5, 1.5)
            net[1].bias.uniform_(-0.3, 0.3)
    x = torch.randn(1, 5, 6)
    path = tmp_path / "ln14.onnx"
    torch.onnx.export(net, (x,), str(path), opset_version=14, dynamo=False, input_names=["x"])
    secure, onnx_out, ops = _secure_and_onnxruntime(path, x.numpy())
    assert ops.count("instnorm") == 1
    np.testing.assert_allclose(secure, onnx_out, rtol=3e-3, atol=2e-3)
