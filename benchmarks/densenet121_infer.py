"""Benchmark: MONAI DenseNet-121 (1x224x224 -> 14 logits) through `privmed infer`.

Runs the three roles as processes over mutual TLS on 127.0.0.1 and, in the same run,
onnxruntime on the same model and input. Prints wall time, bytes, rounds, accuracy and the
per-layer breakdown; writes benchmarks/results/densenet121_<size>.json.

    python benchmarks/densenet121_infer.py [--size 224] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def export(path: Path, size: int, seed: int) -> None:
    import torch
    from monai.networks.nets import DenseNet121

    torch.manual_seed(seed)
    model = DenseNet121(spatial_dims=2, in_channels=1, out_channels=14).eval()
    # trained-looking BatchNorm statistics instead of the identity ones of a fresh model
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 0.5 + 0.75)
    torch.onnx.export(model, torch.zeros(1, 1, size, size), str(path), opset_version=17, dynamo=False, input_names=["image"], output_names=["logits"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import onnxruntime as ort

    from privmed.cli.progress import human_bytes, summary_table
    from privmed.runtime.launch import run_local_session

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / f"densenet121_{args.size}.onnx"
    if not model.exists():
        export(model, args.size, args.seed)
    x = np.random.default_rng(args.seed).standard_normal((1, 1, args.size, args.size)).astype(np.float32)

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    sess.run(None, {"image": x})
    t = time.perf_counter()
    runs = 5
    for _ in range(runs):
        ref = sess.run(None, {"image": x})[0]
    ort_s = (time.perf_counter() - t) / runs

    result = run_local_session(model, x, timeout_s=300)
    st = result.stats.to_dict()
    err = float(np.max(np.abs(result.outputs - ref)))
    summary = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "input": [1, 1, args.size, args.size],
        "secure_wall_s": st["wall_s"],
        "secure_online_s": st["online_s"],
        "onnxruntime_s": round(ort_s, 4),
        "bytes_total": st["bytes_total"],
        "bytes_sent": st["bytes_sent"],
        "rounds": st["rounds"],
        "peak_rss_mb": st["peak_rss_mb"],
        "cpu_s": st["cpu_s"],
        "max_abs_err_logits": err,
        "frac_bits": st["plan"].get("frac_bits"),
        "comparisons": st["plan"].get("comparisons"),
    }
    by_op: dict[str, dict[str, float]] = {}
    for layer in st["layers"]:
        key = layer["op"] + ("/" + layer["kind"] if layer.get("kind") else "")
        agg = by_op.setdefault(key, {"time_s": 0.0, "bytes": 0, "rounds": 0, "count": 0})
        agg["time_s"] += layer["time_s"]
        agg["bytes"] += layer["bytes"]
        agg["rounds"] += layer["rounds"]
        agg["count"] += 1
    summary["by_op"] = {k: {**v, "time_s": round(v["time_s"], 3)} for k, v in by_op.items()}
    (args.out / f"densenet121_{args.size}.json").write_text(json.dumps({**summary, "layers": st["layers"]}, indent=1))
    print(summary_table(result.stats))
    print(f"\nonnxruntime {ort_s * 1000:.1f} ms | secure wall {st['wall_s']:.2f} s (online {st['online_s']:.2f} s) | "
          f"{human_bytes(st['bytes_total'])} | {st['rounds']} rounds | max|secure - onnxruntime| = {err:.2e}")
    print("cpu seconds per role:", st["cpu_s"])
    for k, v in sorted(summary["by_op"].items(), key=lambda kv: -kv[1]["time_s"]):
        print(f"  {k:<22} {v['count']:>4} nodes {v['time_s']:>8.2f} s {human_bytes(v['bytes']):>10} {int(v['rounds']):>6} rounds")


if __name__ == "__main__":
    main()
