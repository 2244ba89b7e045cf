"""3-D convolutions by HE in the two-party mode, measured against the 2-D layer of
docs/twoparty.md in the same run (issue 14).

Layers: the 2-D baseline (128x56x56 -> 32 ch, 3x3, pad 1), and the shapes of a small MONAI
3-D U-Net: 1 -> 16 channels 3x3x3 pad 1 on 32^3, 16 -> 32 channels 3x3x3 stride 2 pad 1 on
32^3, and its way up, 32 -> 16 ConvTranspose 3x3x3 stride 2 (pad 1, output padding 1) on 16^3.
Both parties run as threads over the in-process transport (as benchmarks/twoparty_primitives.py);
bytes are framed bytes sent, CPU is thread CPU time. Also printed: the ciphertext counts of
the alternative lowering (a 3-D conv as kd 2-D HE convs, one per kernel depth, summed on the
model owner), from the encoder, not run.

    .venv/bin/python benchmarks/twoparty_he3d.py [--json benchmarks/results/twoparty_he3d.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from twoparty_primitives import measure_he_layer  # noqa: E402

from privmed.ring.linalg import ConvSpec  # noqa: E402

N = 8192

LAYERS = [
    ("2-D 128x56x56 -> 32, 3x3, pad 1", "conv", (1, 128, 56, 56), (32, 128, 3, 3), ConvSpec((3, 3), (1, 1), (1,) * 4, (1, 1))),
    ("3-D 1x32^3 -> 16, 3x3x3, pad 1", "conv", (1, 1, 32, 32, 32), (16, 1, 3, 3, 3), ConvSpec((3,) * 3, (1,) * 3, (1,) * 6, (1,) * 3)),
    ("3-D 16x32^3 -> 32, 3x3x3, stride 2, pad 1", "conv", (1, 16, 32, 32, 32), (32, 16, 3, 3, 3), ConvSpec((3,) * 3, (2,) * 3, (1,) * 6, (1,) * 3)),
    ("3-D 32x16^3 -> 16, ConvTranspose 3x3x3, stride 2, pad 1, out pad 1", "conv_transpose", (1, 32, 16, 16, 16), (32, 16, 3, 3, 3),
     ConvSpec((3,) * 3, (2,) * 3, (1,) * 6, (1,) * 3, 1, (1,) * 3)),
]  # fmt: skip


def counts(kind: str, spec: ConvSpec, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> dict[str, Any]:
    from privmed.mpc.twoparty.he_encoding import geometry
    from privmed.mpc.twoparty.he_layers import lower

    low = lower(kind, spec, x_shape, w_shape)
    g = geometry(low.kind, low.spec, low.x_shape, low.w_shape, N)
    t = g.tiling
    assert t is not None
    return {"input_cts": g.input_polys(), "reply_cts": g.output_polys(), "products": g.output_polys() * t.n_cb,
            "kernel_plaintexts": low.w_shape[0] * t.n_cb, "tile": [t.cw, *t.win], "channel_blocks": t.n_cb,
            "results_per_reply": len(g.targets()), "est_bytes": int(g.input_polys() * 196.8e3 + g.output_polys() * 16 * (N + len(g.targets())))}  # fmt: skip


def per_depth_2d(x_shape: tuple[int, ...], w_shape: tuple[int, ...], spec: ConvSpec) -> dict[str, Any]:
    """The alternative: every padded depth slice a 2-D input, one reply per (output depth,
    output channel) summing kd products (counts from the 2-D encoder)."""
    n, c, d = x_shape[:3]
    m, s = w_shape[0], spec.strides[0]
    d_pad = d + spec.pads[0] + spec.pads[3]
    d_out = (d_pad - spec.kernel[0]) // s + 1
    spec2 = ConvSpec(spec.kernel[1:], spec.strides[1:], spec.pads[1:3] + spec.pads[4:6], spec.dilations[1:])
    one = counts("conv", spec2, (1, c) + x_shape[3:], (m, c) + w_shape[3:])
    return {"input_cts": n * d_pad * one["input_cts"], "reply_cts": n * d_out * one["reply_cts"],
            "products": n * d_out * spec.kernel[0] * one["products"],
            "est_bytes": int(n * d_pad * one["input_cts"] * 196.8e3 + n * d_out * one["reply_cts"] * 16 * (N + one["results_per_reply"]))}  # fmt: skip


def run_layer(name: str, kind: str, x_shape: tuple[int, ...], w_shape: tuple[int, ...], spec: ConvSpec) -> dict[str, Any]:
    r = measure_he_layer(kind, spec, x_shape, w_shape)
    ok, n_out = r["exact"], r["outputs"]
    out = {"layer": name, "exact": ok, "outputs": n_out, "wall_s": round(r["wall"], 2), "cpu_data_owner_s": round(r["cpu0"], 2),
           "cpu_model_owner_s": round(r["cpu1"], 2), "bytes_data_owner": r["bytes"][0], "bytes_model_owner": r["bytes"][1],
           "bytes_per_output": round(sum(r["bytes"]) / n_out, 1), **counts(kind, spec, x_shape, w_shape)}  # fmt: skip
    if len(x_shape) == 5 and kind == "conv":
        out["per_depth_2d_alternative"] = per_depth_2d(x_shape, w_shape, spec)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    head = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load average {load}"
    print(head)
    rows = []
    for layer in LAYERS:
        row = run_layer(*layer)
        rows.append(row)
        print(json.dumps(row))
    if args.json:
        args.json.write_text(json.dumps({"run": head, "layers": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
