"""3-D convolutions in the two-party mode (no dealer), end to end: Conv / strided Conv /
ConvTranspose with 3-D kernels by HE (``mpc/twoparty/he_encoding``'s 3-D coefficient packing)
through `privmed infer --parties 2` (two processes over mutual TLS) and a MONAI 3-D U-Net
through the two-party launcher, against onnxruntime; `privmed segment --mode 3d --parties 2`
against the thresholded volume.

Tolerance: as ``test_twoparty_infer`` (f = 16 fractional bits): each ReLU / truncation adds
at most 2 ulp, amplified by the next layers' weights (|w| <= ~1.5, at most 4 x 27 terms),
and weights and inputs are rounded to 2^-17; 2e-3 is ~130 ulp, above that bound, far below
a wrong comparison or a wrong HE coefficient (a wrong packing index moves outputs by O(1)).
The U-Nets (PReLU; batch or instance norm) use the dealer mode's bound for MONAI U-Nets
(test_ops: rtol 3e-3, atol 2e-3).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper

from tests.protocol.onnx_models import build, rand

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

H = helper.make_node


def _conv3d_model(path: Path) -> Path:
    rng = np.random.default_rng(0)
    inits = {"w1": rand(rng, 4, 1, 3, 3, 3), "b1": rand(rng, 4), "w2": rand(rng, 8, 4, 3, 3, 3, scale=0.25), "b2": rand(rng, 8),
             "w3": rand(rng, 8, 4, 2, 2, 2), "b3": rand(rng, 4), "w4": rand(rng, 2, 4, 1, 1, 1), "b4": rand(rng, 2)}  # fmt: skip
    nodes = [
        H("Conv", ["x", "w1", "b1"], ["c1"], pads=[1] * 6),
        H("Relu", ["c1"], ["r1"]),
        H("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1] * 6, strides=[2, 2, 2]),
        H("Relu", ["c2"], ["r2"]),
        H("ConvTranspose", ["r2", "w3", "b3"], ["u"], strides=[2, 2, 2]),
        H("Relu", ["u"], ["r3"]),
        H("Conv", ["r3", "w4", "b4"], ["y"]),
    ]
    return build(path, nodes, inits, [1, 1, 8, 8, 8])


def test_3d_conv_relu_conv_transpose_two_processes_no_dealer_matches_onnxruntime(tmp_path: Path) -> None:
    # Prepare
    model = _conv3d_model(tmp_path / "c3.onnx")
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, "-m", "privmed.cli.main", "infer", "--parties", "2", "--model", str(model), "--input",
           str(tmp_path / "x.npy"), "--output", str(tmp_path / "y.npy"), "--stats", str(tmp_path / "stats.json"), "--timeout", "60"]  # fmt: skip

    # Execute
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)

    # Assert
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    want = sess.run(None, {"x": x})[0]
    got = np.load(tmp_path / "y.npy")
    assert got.shape == want.shape == (1, 2, 8, 8, 8)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert set(stats["bytes_sent"]) == {"data-owner", "model-owner"} and stats["offline_bytes"] > 0


def test_segment_mode_3d_two_parties_gives_the_threshold_mask(tmp_path: Path) -> None:
    """`privmed segment --mode 3d --parties 2` on 8^3 patches of a CT phantom with the 1x1x1-conv
    threshold model of test_segment_support: the mask equals the thresholded volume (the
    steep threshold needs --frac-bits 10 to fit the two-party ring's headroom)."""
    import nibabel as nib

    from privmed.cli.main import main as privmed_main
    from privmed.data.synth_ct import ct_affine, ct_phantom
    from privmed.data.writers import write_nifti
    from tests.unit.test_segment_support import threshold_labels, threshold_model

    # Prepare
    hu = np.rint(ct_phantom(np.random.default_rng(12), (16, 20, 24))[0])
    ct = write_nifti(tmp_path / "ct.nii.gz", hu.astype(np.int16), ct_affine((16, 20, 24), (2.0, 0.8, 0.8)))
    model = threshold_model(tmp_path / "t3.onnx", 3, 8)

    # Execute
    code = privmed_main(["segment", "--model", str(model), "--input", str(ct), "--output", str(tmp_path / "m.nii.gz"),
                         "--mode", "3d", "--parties", "2", "--frac-bits", "10"])  # fmt: skip

    # Assert
    assert code == 0
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "m.nii.gz")).dataobj), threshold_labels(hu))


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_monai_unet_3d_through_the_two_party_launcher_matches_onnxruntime(tmp_path: Path, norm: str) -> None:
    """MONAI UNet(spatial_dims=3, channels=(4, 8), strides=(2,)) on 16^3: strided 3-D conv,
    3-D conv-transpose, the concatenation, PReLU (per-channel scales by OT); with BatchNorm
    (folded into the convs: narrow ring) and with MONAI's default instance norm (wide ring:
    Beaver products, HE results extended back to 64 bits)."""
    import torch
    from monai.networks.nets import UNet

    from privmed.runtime.twoparty_launch import run_local_session_2p

    # Prepare
    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,), norm=norm).eval()
    for m in net.modules():  # trained-looking statistics (MONAI's initial ones are 0 and 1)
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 1, 16, 16, 16)
    path = tmp_path / "unet3d.onnx"
    torch.onnx.export(net, (x,), str(path), opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])

    # Execute
    result = run_local_session_2p(path, x.numpy(), timeout_s=300)

    # Assert
    want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    assert result.outputs.shape == want.shape == (1, 2, 16, 16, 16)
    np.testing.assert_allclose(result.outputs, want, rtol=3e-3, atol=2e-3)
    assert set(result.stats.bytes_sent) == {"data-owner", "model-owner"}
