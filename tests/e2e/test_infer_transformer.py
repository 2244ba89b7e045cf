"""End to end through the `privmed infer` CLI (three processes, mutual TLS on 127.0.0.1) for a
network that needs every piece of issue 13 at once: MONAI's ViT (LayerNorm, GELU, softmax
inside, Q K^T and P V as secret products, the class token) with a Tanh classification head,
and an AttentionUnet-style gate (Sigmoid inside, a broadcast secret product) before it.

Tolerance: as tests/protocol/test_transformers.py, 2e-3 (measured 2.2e-4 on outputs up to 0.48).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from .conftest import export_gated_vit

pytest.importorskip("einops")


@pytest.mark.slow
def test_gated_vit_through_privmed_infer_matches_onnxruntime(tmp_path: Path) -> None:
    path = export_gated_vit(tmp_path / "gated_vit.onnx")
    x = np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    cmd = [sys.executable, "-m", "privmed.cli.main", "infer", "--model", str(path), "--input", str(tmp_path / "x.npy"),
           "--output", str(tmp_path / "y.npy"), "--stats", str(tmp_path / "s.json")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    secure = np.load(tmp_path / "y.npy")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert secure.shape == ref.shape == (1, 3)
    assert np.abs(secure - ref).max() < 2e-3
    ops = {layer["op"] for layer in json.loads((tmp_path / "s.json").read_text())["layers"]}
    assert {"approx", "softmax", "einsum", "mul", "instnorm"} <= ops
