"""Load test: H hospitals at once against one model owner service and one dealer service.

Everything over mutual TLS on 127.0.0.1, every organisation with its own key (request/sign).
Phase 1 runs each hospital's job alone, one after the other (the single-session reference);
phase 2 starts all H jobs at once (``max_sessions`` = H). Checks: every output of phase 2
matches the same hospital's phase-1 output and onnxruntime, no job lost or duplicated (one
output row per image, one ``ok`` audit line per job with a distinct session id). Reports
throughput of both phases and each role's peak memory; writes
benchmarks/results/service_load.json. Bounded: every process has a deadline.

    python benchmarks/service_load.py [--hospitals 8] [--images 32] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PRIVMED = [sys.executable, "-m", "privmed.cli.main"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
DEADLINE_S = 600.0


def export_cnn(path: Path, size: int) -> None:
    import torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 3), torch.nn.Softmax(dim=1),
    ).eval()
    torch.onnx.export(net, (torch.zeros(1, 1, size, size),), str(path), opset_version=17, dynamo=False, input_names=["x"],
                      output_names=["probs"], dynamic_axes={"x": {0: "n"}, "probs": {0: "n"}})


def setup(base: Path, hospitals: int, images: int, size: int) -> list[str]:
    """CA, keys by request/sign, service files, each hospital's images; returns hospital names."""
    from privmed.crypto.certs import init_ca
    from privmed.crypto.csr import request, sign

    init_ca(base / "ca")
    names = [f"hospital-{i}" for i in range(hospitals)]
    parties = [("vendor", "model-owner", "Vendor"), ("helper", "dealer", "Helper")] + [(n, "data-owner", n) for n in names]
    for folder, role, org in parties:
        _key, csr = request(role, org, base / folder)
        sign(base / "ca", csr, role, base / folder / f"{role}.pem")
        (base / folder / "ca.pem").write_bytes((base / "ca" / "ca.pem").read_bytes())
    ports = {"vendor": _free_port(), "helper": _free_port()}
    common = f'host = "127.0.0.1"\nca = "ca.pem"\nmax_sessions = {hospitals}\ntimeout_s = 300\nconnect_timeout_s = 60\naudit_log = "audit.jsonl"\n'
    (base / "vendor" / "service.toml").write_text(
        f'[service]\nport = {ports["vendor"]}\ncert = "model-owner.pem"\nkey = "model-owner.key"\n{common}'
        f'allow = {json.dumps([f"O={n}" for n in names])}\n\n[dealer]\nhost = "127.0.0.1"\nport = {ports["helper"]}\n')
    (base / "helper" / "service.toml").write_text(
        f'[service]\nport = {ports["helper"]}\ncert = "dealer.pem"\nkey = "dealer.key"\n{common}allow = ["O=Vendor"]\n')
    gen = np.random.default_rng(0)
    for n in names:
        (base / n / "session.toml").write_text(
            '[session]\nca = "ca.pem"\ntimeout_s = 300\nconnect_timeout_s = 60\n\n[data-owner]\ncert = "data-owner.pem"\nkey = "data-owner.key"\n\n'
            f'[model-owner]\nhost = "127.0.0.1"\nport = {ports["vendor"]}\ncert = "-"\nkey = "-"\n\n'
            f'[dealer]\nhost = "127.0.0.1"\nport = {ports["helper"]}\ncert = "-"\nkey = "-"\n')
        np.save(base / n / "images.npy", gen.standard_normal((images, 1, size, size)).astype(np.float32))
    export_cnn(base / "vendor" / "model.onnx", size)
    return names


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_service(folder: Path, argv: list[str]) -> subprocess.Popen:
    out = open(folder / "service.out", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(PRIVMED + argv, cwd=folder, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    deadline = time.monotonic() + 120
    while b"listening on" not in (folder / "service.out").read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"service in {folder} did not start:\n{(folder / 'service.out').read_text()}")
        time.sleep(0.1)
    return proc


def _jobs(base: Path, names: list[str], tag: str, at_once: bool) -> float:
    """Run each hospital's job (all at once or one after the other); returns the wall time."""
    t0 = time.monotonic()
    procs = []
    for n in names:
        argv = ["infer", "--service", "session.toml", "--model-name", "cnn", "--input", "images.npy", "--chunk", "4",
                "--output", f"{tag}.npy", "--stats", f"{tag}.stats.json"]
        p = subprocess.Popen(PRIVMED + argv, cwd=base / n, stdout=subprocess.DEVNULL, stderr=open(base / n / f"{tag}.err", "wb"), env=ENV)  # noqa: SIM115
        procs.append(p)
        if not at_once:
            p.wait(timeout=DEADLINE_S)
    for n, p in zip(names, procs, strict=True):
        if p.wait(timeout=DEADLINE_S) != 0:
            raise SystemExit(f"{n} {tag} failed: {(base / n / f'{tag}.err').read_text()[-500:]}")
    return time.monotonic() - t0


def _peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hospitals", type=int, default=8)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=32)
    args = ap.parse_args()
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        names = setup(base, args.hospitals, args.images, args.size)
        helper = _start_service(base / "helper", ["serve", "dealer", "--config", "service.toml"])
        vendor = _start_service(base / "vendor", ["serve", "model-owner", "--config", "service.toml", "--model", "cnn=model.onnx"])
        try:
            sequential_s = _jobs(base, names, "alone", at_once=False)
            concurrent_s = _jobs(base, names, "together", at_once=True)
            service_mb = {"model-owner": _peak_mb(vendor.pid), "dealer": _peak_mb(helper.pid)}
        finally:
            for p in (vendor, helper):
                p.terminate()
                p.wait(timeout=120)
        sess = ort.InferenceSession(str(base / "vendor" / "model.onnx"), providers=["CPUExecutionProvider"])
        diffs_alone, diffs_ort, hospital_mb, session_s, alone_s = [], [], [], [], []
        for n in names:
            x = np.load(base / n / "images.npy")
            alone, together = np.load(base / n / "alone.npy"), np.load(base / n / "together.npy")
            assert together.shape == (args.images, 3), f"{n}: {together.shape} rows for {args.images} images"
            diffs_alone.append(float(np.abs(together - alone).max()))
            diffs_ort.append(float(np.abs(together - sess.run(None, {"x": x})[0]).max()))
            stats = json.loads((base / n / "together.stats.json").read_text())
            hospital_mb.append(stats["peak_rss_mb"])
            session_s.append(stats["wall_s"])
            alone_s.append(json.loads((base / n / "alone.stats.json").read_text())["wall_s"])
        audit = [json.loads(line) for line in (base / "vendor" / "audit.jsonl").read_text().splitlines()]
        ok = [r for r in audit if r["outcome"] == "ok"]
        assert len(ok) == 2 * len(names) and len({r["session"] for r in ok}) == len(ok), "a job lost or duplicated"
        assert all(r["images"] == args.images for r in ok) and len(audit) == len(ok), audit
        assert max(diffs_alone) < 1e-3 and max(diffs_ort) < 1e-3, (diffs_alone, diffs_ort)
    total = args.hospitals * args.images
    result = {
        "hospitals": args.hospitals, "images_per_hospital": args.images, "input": [1, args.size, args.size],
        "sequential_s": round(sequential_s, 2), "concurrent_s": round(concurrent_s, 2),
        "sequential_images_per_s": round(total / sequential_s, 2), "concurrent_images_per_s": round(total / concurrent_s, 2),
        "session_wall_s_alone": {"min": min(alone_s), "max": max(alone_s)},
        "session_wall_s_concurrent": {"min": min(session_s), "max": max(session_s)},
        "max_diff_concurrent_vs_alone": max(diffs_alone), "max_diff_vs_onnxruntime": max(diffs_ort),
        "peak_rss_mb": {**{k: round(v, 1) for k, v in service_mb.items()}, "data-owner (max over hospitals)": max(hospital_mb)},
        "cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "python": platform.python_version(),
    }
    print(json.dumps(result, indent=1))
    out = Path(__file__).parent / "results" / "service_load.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
