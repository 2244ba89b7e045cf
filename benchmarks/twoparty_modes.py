"""Benchmark: one model, one input, the dealer mode and the two-party mode through the same
local-session entry points `privmed infer` uses, and onnxruntime, in one run.

Each mode: wall, offline/online split, bytes per role, rounds, CPU seconds and peak RSS per
role, max |secure - onnxruntime|; with the date, machine and load average before and after.
Writes benchmarks/results/twoparty_<name>.json.

    python benchmarks/twoparty_modes.py                      # the shipped demo model, 1x64x64
    python benchmarks/twoparty_modes.py --densenet 64        # MONAI DenseNet-121 at 64x64
    python benchmarks/twoparty_modes.py --modes 2            # two-party only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _paths import shown  # noqa: E402

DEMO = ROOT / "src/privmed/assets/models/chest_smallcnn.onnx"


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=DEMO)
    ap.add_argument("--densenet", type=int, metavar="SIZE", help="export MONAI DenseNet-121 at SIZE x SIZE instead")
    ap.add_argument("--modes", default="3,2", help="comma-separated party counts to run (default 3,2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    import onnxruntime as ort

    from privmed.runtime.launch import run_local_session
    from privmed.runtime.twoparty_launch import run_local_session_2p

    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if args.densenet:
        from densenet121_infer import export  # type: ignore[import-not-found]

        model = args.out / f"densenet121_{args.densenet}.onnx"
        if not model.exists():
            export(model, args.densenet, args.seed)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
    x = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    result: dict = {"model": shown(model), "input_shape": shape, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                    "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version()},
                    "load_before": os.getloadavg(), "modes": {}}  # fmt: skip
    for parties in (int(m) for m in args.modes.split(",")):
        run = run_local_session_2p if parties == 2 else run_local_session
        t0 = time.perf_counter()
        out = run(model, x, timeout_s=args.timeout)
        stats = out.stats
        row = {
            "wall_s": round(time.perf_counter() - t0, 3), "online_s": stats.online_s, "offline_s": stats.offline_s,
            "offline_bytes": stats.offline_bytes, "bytes_sent": stats.bytes_sent, "bytes_total": stats.bytes_total,
            "rounds": stats.rounds, "cpu_s": stats.cpu_s, "peak_rss_mb": stats.peak_rss_mb,
            "max_abs_diff_vs_onnxruntime": float(np.abs(out.outputs - ref).max()), "load_after": os.getloadavg(),
        }  # fmt: skip
        result["modes"][f"{parties}-party"] = row
        print(f"{parties} parties: {json.dumps(row)}", flush=True)
    name = f"densenet121_{args.densenet}" if args.densenet else model.stem
    path = args.out / f"twoparty_{name}.json"
    path.write_text(json.dumps(result, indent=1))
    print(f"written {path}")


if __name__ == "__main__":
    main()
