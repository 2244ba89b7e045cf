"""Products of two secret tensors as in attention: MatMul(Q, K^T) and Einsum, one Beaver
product over the einsum map each, securely vs the fixed-point reference and onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from privmed.compiler.compile import compile_model
from privmed.ir.walk import run_plan
from privmed.mpc.correlation.requests import ProductSpec
from privmed.reference.executors import FixedBackend
from tests.protocol.harness import run_three


class _Attention:
    """Tokens (n, d) -> q, k, v (linear) -> S = q k^T / sqrt(d) -> tanh(S) v (a softmax-free
    attention: the products and their shapes are what this test is about)."""

    @staticmethod
    def build(use_einsum: bool) -> object:
        import torch

        class Block(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.q, self.k, self.v = (torch.nn.Linear(8, 8) for _ in range(3))
                self.out = torch.nn.Linear(8, 3)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                q, k, v = (f(x).reshape(1, 5, 2, 4).transpose(1, 2) for f in (self.q, self.k, self.v))  # (batch, heads, tokens, dh)
                if use_einsum:
                    s = torch.einsum("bhxd,bhyd->bhxy", q, k)
                else:
                    s = torch.matmul(q, k.transpose(-1, -2))
                o = torch.matmul(torch.tanh(s * 0.5), v) if not use_einsum else torch.einsum("bhxy,bhyd->bhxd", torch.tanh(s * 0.5), v)
                return self.out(o.transpose(1, 2).reshape(1, 5, 8))

        torch.manual_seed(0)
        return Block().eval()


@pytest.mark.parametrize("use_einsum", [False, True], ids=["matmul", "einsum"])
def test_secret_times_secret_attention_products(tmp_path: Path, use_einsum: bool) -> None:
    """Tolerance: q, k, v carry a few ulps (2^-16) of rounding each; S sums 4 products of
    values below ~2, the output 5 more and a linear layer of 8: ~1e-3 (measured 3.0e-5)."""
    import torch

    net = _Attention.build(use_einsum)
    x = torch.randn(1, 5, 8)
    path = tmp_path / "att.onnx"
    torch.onnx.export(net, (x,), str(path), opset_version=17, dynamo=False, input_names=["x"], output_names=["y"])
    plan, weights = compile_model(path, calibration=x.numpy())
    einsums = [n for n in plan.nodes if n.op == "einsum"]
    assert len(einsums) == 2 and einsums[0].shape == [2, 5, 5]
    secure, stats = run_three(plan, weights, x.numpy().astype(np.float64))
    ref, _ = run_plan(plan, FixedBackend(plan, weights, x.numpy().astype(np.float64)), 1)
    onnx_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(secure, onnx_out, rtol=0, atol=1e-3)
    np.testing.assert_allclose(secure, ref, rtol=0, atol=5e-4)  # + the tanh's knot crossings (2e-4 at most)


def test_einsum_correlation_has_the_product_shape() -> None:
    spec = ProductSpec((2, 3, 5, 4), (2, 3, 6, 4), equation="zhxd,zhyd->zhxy")
    assert spec.out_shape == (2, 3, 5, 6)
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 2**63, s, dtype=np.uint64) * np.uint64(2) + np.uint64(1) for s in ((2, 3, 5, 4), (2, 3, 6, 4)))
    want = np.array([[[[sum(int(a[z, h, i, d]) * int(b[z, h, j, d]) for d in range(4)) % 2**64 for j in range(6)] for i in range(5)]
                      for h in range(3)] for z in range(2)], dtype=np.uint64)
    np.testing.assert_array_equal(spec.bilinear(a, b), want)  # exact modulo 2^64, as the dealer needs
