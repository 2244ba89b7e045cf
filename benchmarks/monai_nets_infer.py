"""Benchmark: MONAI networks at their default settings through `privmed infer`, issue 13's set.

Each network runs as the three roles (processes, mutual TLS on 127.0.0.1) and, in the same
run, through onnxruntime on the same model and input. Prints wall time, bytes, rounds, the
accuracy against onnxruntime and where the time goes per op type; writes
benchmarks/results/monai_<net>_<size>[_f<bits>].json.

    python benchmarks/monai_nets_infer.py unet --size 256     # UNet (PReLU, instance norm)
    python benchmarks/monai_nets_infer.py unetr --size 64     # UNETR, 12 transformer layers
    python benchmarks/monai_nets_infer.py attentionunet|segresnet|efficientnet|vit|swinunetr --size 64 [--frac-bits 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np


def build(net: str, size: int) -> Any:
    import torch
    from monai.networks import nets

    torch.manual_seed(0)
    if net == "unet":  # the MONAI tutorials' 2-D configuration; everything else at its default
        return nets.UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2))
    if net == "attentionunet":
        return nets.AttentionUnet(spatial_dims=2, in_channels=1, out_channels=2, channels=(16, 32, 64, 128), strides=(2, 2, 2))
    if net == "segresnet":
        return nets.SegResNet(spatial_dims=2, in_channels=1, out_channels=2)
    if net == "efficientnet":
        model = nets.EfficientNetBN("efficientnet-b0", spatial_dims=2, in_channels=1, num_classes=2, pretrained=False)
        gen = torch.Generator().manual_seed(1)  # trained-looking BatchNorm statistics
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1, generator=gen)
                    m.running_var.uniform_(0.5, 2.0, generator=gen)
        return model
    if net == "unetr":
        return nets.UNETR(in_channels=1, out_channels=2, img_size=(size, size), feature_size=16, hidden_size=96, mlp_dim=384,
                          num_heads=4, spatial_dims=2)  # fmt: skip
    if net == "swinunetr":
        return nets.SwinUNETR(in_channels=1, out_channels=2, spatial_dims=2)
    if net == "vit":
        return nets.ViT(in_channels=1, img_size=(size, size), patch_size=(16, 16), spatial_dims=2, hidden_size=96, mlp_dim=384,
                        num_heads=4, classification=True, num_classes=2)  # fmt: skip
    raise SystemExit(f"unknown net {net!r}")


def export(net: str, size: int, path: Path) -> None:
    import torch

    class First(torch.nn.Module):  # ViT returns (logits, hidden states)
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.inner(x)
            return y[0] if isinstance(y, tuple | list) else y

    model = First(build(net, size)).eval()
    torch.onnx.export(model, torch.zeros(1, 1, size, size), str(path), opset_version=17, dynamo=False, input_names=["image"],
                      output_names=["out"])  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("net")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--frac-bits", type=int, default=None, help="fixed-point fractional bits (default: the compiler's, at most 16)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import onnxruntime as ort

    from privmed.cli.progress import human_bytes
    from privmed.runtime.launch import run_local_session

    args.out.mkdir(parents=True, exist_ok=True)
    name = f"monai_{args.net}_{args.size}" + (f"_f{args.frac_bits}" if args.frac_bits else "")
    model = args.out / f"{name}.onnx"
    export(args.net, args.size, model)
    x = np.random.default_rng(0).standard_normal((1, 1, args.size, args.size)).astype(np.float32)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    sess.run(None, {"image": x})
    t = time.perf_counter()
    for _ in range(5):
        ref = sess.run(None, {"image": x})[0]
    ort_s = (time.perf_counter() - t) / 5

    result = run_local_session(model, x, timeout_s=600, frac_bits=args.frac_bits)
    st = result.stats.to_dict()
    err = float(np.max(np.abs(result.outputs - ref)))
    by_op: dict[str, dict[str, float]] = {}
    for layer in st["layers"]:
        agg = by_op.setdefault(layer["op"], {"time_s": 0.0, "bytes": 0, "rounds": 0, "count": 0})
        for key in ("time_s", "bytes", "rounds"):
            agg[key] += layer[key]
        agg["count"] += 1
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, load {os.getloadavg()[0]:.1f}",
        "net": args.net, "input": [1, 1, args.size, args.size],
        "secure_wall_s": st["wall_s"], "secure_online_s": st["online_s"], "onnxruntime_s": round(ort_s, 4),
        "bytes_total": st["bytes_total"], "bytes_sent": st["bytes_sent"], "rounds": st["rounds"],
        "max_abs_err": err, "max_abs_out": float(np.max(np.abs(ref))), "frac_bits": st["plan"].get("frac_bits"),
        "by_op": {k: {**v, "time_s": round(v["time_s"], 3)} for k, v in by_op.items()},
    }  # fmt: skip
    (args.out / f"{name}.json").write_text(json.dumps(summary, indent=1))
    model.unlink()
    print(f"{args.net} {args.size}x{args.size} (f = {summary['frac_bits']}): onnxruntime {ort_s * 1000:.1f} ms | secure wall {st['wall_s']:.2f} s "
          f"(online {st['online_s']:.2f} s) | {human_bytes(st['bytes_total'])} | {st['rounds']} rounds | "
          f"max|secure - onnxruntime| = {err:.2e} (outputs up to {summary['max_abs_out']:.2f})")  # fmt: skip
    for k, v in sorted(by_op.items(), key=lambda kv: -kv[1]["time_s"]):
        print(f"  {k:<12} {v['count']:>4} nodes {v['time_s']:>8.2f} s {human_bytes(v['bytes']):>10} {int(v['rounds']):>6} rounds")


if __name__ == "__main__":
    main()
