"""MONAI's vision transformers at their default settings (small sizes), securely vs
onnxruntime: every piece of attention on shares (LayerNorm, Q K^T and P V as Beaver einsums,
softmax inside, GELU, the class token as the model owner's private constant, einops'
"b h (qkv l d) -> qkv b l h d" as public slices).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from privmed.compiler.compile import compile_model
from tests.protocol.harness import run_three

pytest.importorskip("einops")  # MONAI's transformer blocks import it (privmed[ml] installs it)


def _run(net: object, path: Path) -> tuple[set[str], float, float]:
    import torch

    class First(torch.nn.Module):  # ViT returns (logits, hidden states)
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            return y[0] if isinstance(y, tuple | list) else y

    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.onnx.export(First(net), (x,), str(path), opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
    plan, weights = compile_model(path, calibration=x.numpy())
    secure, _ = run_three(plan, weights, x.numpy().astype(np.float64), timeout_s=300)
    onnx_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    return {n.op for n in plan.nodes}, float(np.abs(secure - onnx_out).max()), float(np.abs(onnx_out).max())


def test_monai_vit_classifier_runs_securely(tmp_path: Path) -> None:
    """2 layers, 4 heads, hidden 48, 16 patches + the class token. Tolerance: LayerNorm's
    relative 3e-3 (test_norms) on unit-variance features, then softmax (1.3e-4 (1 + L p)) and
    GELU (1.3e-4) per block, through linear layers of gain ~1: 2e-3 (measured 1.3e-4)."""
    import torch
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    net = ViT(in_channels=1, img_size=(32, 32), patch_size=(8, 8), spatial_dims=2, hidden_size=48, mlp_dim=96, num_layers=2,
              num_heads=4, classification=True).eval()  # fmt: skip
    ops, err, top = _run(net, tmp_path / "vit.onnx")
    assert {"softmax", "einsum", "approx", "instnorm"} <= ops
    assert err < 2e-3 and top > 0.1


@pytest.mark.slow
def test_monai_unetr_runs_securely(tmp_path: Path) -> None:
    """UNETR with its default 12 transformer layers (hidden 48, 4 heads) on 32x32 2-D input.
    Tolerance: as the ViT's, over 12 blocks and the convolutional decoder's instance norms
    (rtol 3e-3 on outputs up to ~3.4): 1e-2 (measured 1.2e-3)."""
    import torch
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    net = UNETR(in_channels=1, out_channels=2, img_size=(32, 32), feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4,
                spatial_dims=2).eval()  # fmt: skip
    ops, err, top = _run(net, tmp_path / "unetr.onnx")
    assert {"softmax", "einsum", "approx", "instnorm", "leaky_relu"} <= ops
    assert err < 1e-2 and top > 1.0
