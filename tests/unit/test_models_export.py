"""ONNX export: graph validity, onnxruntime == torch, and the secure engine's op set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from privmed.errors import ModelError
from privmed.models.export import export_onnx, op_counts, preprocess_path, read_metadata
from privmed.models.zoo import build_model

# The ops the secure-inference engine runs (DESIGN section 3; compiler owns the real list).
SECURE_OPS = {
    "Conv", "ConvTranspose", "BatchNormalization", "Relu", "LeakyRelu", "MaxPool",
    "AveragePool", "GlobalAveragePool", "Gemm", "MatMul", "Add", "Mul", "Concat", "Flatten",
    "Reshape", "Pad", "Resize", "Identity", "Constant", "Sigmoid", "Softmax",
}  # fmt: skip

# (name, spatial_dims, input side) -- the smallest sides each model accepts, to stay fast.
CASES = [
    ("small-cnn", 2, 64),
    ("small-cnn", 3, 64),
    ("resnet18", 2, 32),
    ("densenet121", 2, 32),
    ("unet2d", 2, 32),
    ("unet3d", 3, 16),
]


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _randomise_batchnorm(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Give BN non-trivial statistics so that BN folding at export is really exercised."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(0.2 * torch.randn(n, generator=gen))
            module.running_var.copy_(0.5 + torch.rand(n, generator=gen))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=gen))
            module.bias.data.copy_(0.1 * torch.randn(n, generator=gen))


def _ort_run(path: Path, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize(("name", "dims", "side"), CASES)
def test_export_matches_torch_and_uses_secure_ops(
    tmp_path: Path, name: str, dims: int, side: int
) -> None:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = build_model(name, 1, 3, spatial_dims=dims)
    _randomise_batchnorm(model, gen)
    model.eval()
    x = torch.randn((1, 1) + (side,) * dims, generator=gen)
    with torch.no_grad():
        expected = model(x).numpy()

    path = export_onnx(model, tuple(x.shape), tmp_path / f"{name}.onnx")
    got = _ort_run(path, x.numpy())

    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert got.shape == expected.shape
    # float32 throughout; BN folding reassociates sums, so errors are ~1e-6 relative.
    # 1e-4 of the output scale leaves a wide margin and still catches a wrong layer.
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * scale)
    ops = op_counts(path)
    assert set(ops) <= SECURE_OPS, f"{name}: ops outside the secure set: {set(ops) - SECURE_OPS}"


def test_secure_models_export_as_plain_chains(tmp_path: Path) -> None:
    """small-cnn and the U-Nets: BN folded into Conv, no Dropout, no Identity, no pool at 64."""
    small = op_counts(
        export_onnx(build_model("small-cnn", 1, 2), (1, 1, 64, 64), tmp_path / "s.onnx")
    )
    unet = op_counts(export_onnx(build_model("unet2d", 1, 2), (1, 1, 32, 32), tmp_path / "u.onnx"))

    assert small == {"Conv": 4, "Relu": 4, "Flatten": 1, "Gemm": 1}
    assert unet == {"Conv": 19, "Relu": 18, "MaxPool": 4, "ConvTranspose": 4, "Concat": 4}


def test_group_norm_export_leaves_the_secure_set(tmp_path: Path) -> None:
    """Documented limitation: GroupNorm (for DP) exports to ops the engine cannot run."""
    model = build_model("small-cnn", 1, 2, norm="group")
    ops = op_counts(export_onnx(model, (1, 1, 64, 64), tmp_path / "gn.onnx"))
    assert "InstanceNormalization" in ops


def test_export_restores_training_mode_and_writes_sidecars(tmp_path: Path) -> None:
    model = build_model("small-cnn", 1, 2).train()
    preprocess = {"size": [64, 64], "normalize": "zscore"}

    path = export_onnx(
        model, (1, 1, 64, 64), tmp_path / "sub" / "m.onnx", preprocess,
        metadata={"privmed.labels": json.dumps(["a", "b"])},
    )  # fmt: skip

    assert model.training
    assert preprocess_path(path) == tmp_path / "sub" / "m.preprocess.json"
    assert json.loads(preprocess_path(path).read_text()) == preprocess
    assert json.loads(read_metadata(path)["privmed.labels"]) == ["a", "b"]


def test_export_failure_is_one_line_model_error(tmp_path: Path) -> None:
    model = build_model("small-cnn", 1, 2)  # 4 stride-2 layers + 4x4 grid need sides of 64k

    with pytest.raises(ModelError) as info:
        export_onnx(model, (1, 1, 48, 48), tmp_path / "bad.onnx")

    assert "\n" not in str(info.value)
    assert "bad.onnx" in str(info.value)
