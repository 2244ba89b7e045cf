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


def test_window_attention_with_windows_merged_into_the_batch_axis(tmp_path: Path) -> None:
    """Swin's window partition: (b, H, W, C) -> (b * windows, tokens, C), attention per window,
    then the reverse. Per sample the windows are a leading axis (compiler ``Ref.merged``).
    Tolerance: as test_attention (softmax 1.3e-4 (1 + L p) on 16 tokens, products of values
    below ~2): 1e-3."""
    import torch

    class WindowAttention(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(4, 12), torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, h, w, c = x.shape
            win = x.view(b, h // 4, 4, w // 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, c)
            qkv = self.qkv(win).reshape(-1, 16, 3, 2, 2).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            att = torch.softmax((q * 0.7) @ k.transpose(-2, -1), dim=-1)
            out = self.proj((att @ v).transpose(1, 2).reshape(-1, 16, c))
            return out.view(b, h // 4, w // 4, 4, 4, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)

    torch.manual_seed(0)
    net = WindowAttention().eval()
    x = torch.randn(3, 8, 8, 4)  # a batch of 3: the windows of different samples never mix
    path = tmp_path / "win.onnx"
    torch.onnx.export(net, (x[:1],), str(path), opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
    plan, weights = compile_model(path, calibration=x.numpy())
    assert [n.shape for n in plan.nodes if n.op == "softmax"] == [[4, 2, 16, 16]]  # 4 windows per sample
    secure, _ = run_three(plan, weights, x.numpy().astype(np.float64))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = np.concatenate([sess.run(None, {"x": x[i : i + 1].numpy()})[0] for i in range(3)])
    np.testing.assert_allclose(secure, onnx_out, rtol=0, atol=1e-3)


@pytest.mark.slow
def test_monai_swin_unetr_with_default_settings_runs_securely(tmp_path: Path) -> None:
    """SwinUNETR at its defaults (feature 24, depths 2-2-2-2, shifted windows of 7, heads 3-24)
    in 2-D at 64x64: window partition folds windows into the batch axis, the shifted-window
    mask is folded at compile time (ScatterND, Not on shapes). Tolerance as UNETR's: 1e-2
    (measured 7.0e-4 on another standard-normal input)."""
    import torch
    from monai.networks.nets import SwinUNETR

    torch.manual_seed(0)
    net = SwinUNETR(in_channels=1, out_channels=2, spatial_dims=2).eval()
    x = torch.randn(1, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    path = tmp_path / "swin.onnx"
    torch.onnx.export(net, (x,), str(path), opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
    plan, weights = compile_model(path, calibration=x.numpy())
    secure, _ = run_three(plan, weights, x.numpy().astype(np.float64), timeout_s=600)
    onnx_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert {"softmax", "einsum", "approx", "instnorm"} <= {n.op for n in plan.nodes}
    assert float(np.abs(secure - onnx_out).max()) < 1e-2 and float(np.abs(onnx_out).max()) > 1.0
