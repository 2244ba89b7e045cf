"""``run_local_session``: the three roles as three OS processes on this machine.

Each role is ``python -m privmed.cli.main party --role ...`` talking TCP + mutual TLS 1.3 on
127.0.0.1 with OS-assigned ports and an ephemeral CA made for the run, exactly as a
deployment with three hosts would (only the addresses differ). The data owner streams
per-layer progress as JSON lines on stdout; every role writes its stats JSON; a role that exits
non-zero stops the others at once and its one-line error is raised here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privmed.compiler import onnx_front
from privmed.compiler.lower import check_supported
from privmed.crypto.certs import ROLES, ephemeral_session
from privmed.errors import InputError, PeerError, PrivmedError
from privmed.runtime.config import Endpoint, write_config

log = logging.getLogger(__name__)


@dataclass
class SessionResult:
    outputs: np.ndarray  # what the data owner learned (final Sigmoid/Softmax applied in clear)
    stats: dict[str, Any] = field(default_factory=dict)


def check_input(model_path: Path, x: np.ndarray, input_shape: list[int] | None = None) -> onnx_front.OnnxGraph:
    """Fail fast, before any process starts: bad model file, unsupported ops, wrong input."""
    graph = onnx_front.load(Path(model_path), input_shape)
    check_supported(graph, Path(model_path))
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise InputError(f"input must be a float32 array, got {getattr(x, 'dtype', type(x))}")
    if list(x.shape[1:]) != list(graph.input_shape) or x.ndim != len(graph.input_shape) + 1:
        want = ", ".join(map(str, graph.input_shape))
        raise InputError(f"input shape {tuple(x.shape)} does not match the model input (N, {want}) of {model_path}")
    if not np.all(np.isfinite(x)):
        raise InputError("input contains NaN or infinite values")
    return graph


def _first_error(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("privmed: error:"):
            return ln[len("privmed: error:") :].strip()
    return lines[-1] if lines else "exited without a message"


def run_local_session(
    model_path: Path,
    inputs: np.ndarray,
    *,
    timeout_s: float = 120.0,
    workdir: Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    calibration: Path | None = None,
    frac_bits: int | None = None,
    input_shape: list[int] | None = None,
    chunk: int | None = None,
    stall_s: float | None = None,
    expect_plan: str | None = None,
) -> SessionResult:
    """Run one secure-inference session of ``model_path`` on ``inputs`` (N, ...) float32.

    With ``chunk`` the N inputs stream through the session in batches of that size (memory
    stays bounded by one batch; the masked weights are sent once for the whole session).

    Every receive of every role has its own deadline (``timeout_s``). On top, the launcher
    stops the session when the data owner reports no progress (one line per layer) for
    ``stall_s`` seconds (default ``20 * timeout_s``), e.g. a role stuck without waiting on a
    receive. It is a watchdog on progress, not a limit on the session's length: a volume of
    hundreds of slices may run for hours.

    ``expect_plan``: the data owner refuses any plan whose SHA-256 fingerprint differs (the
    fingerprint of the accepted plan is in ``stats["plan"]["fingerprint"]``).
    """
    x = np.ascontiguousarray(inputs, dtype=np.float32) if isinstance(inputs, np.ndarray) and inputs.dtype.kind == "f" else inputs
    check_input(Path(model_path), x, input_shape)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="privmed-", dir=workdir) as tmp_s:
        tmp = Path(tmp_s)
        ids = ephemeral_session(tmp / "certs")
        eps = {r: Endpoint("127.0.0.1", 0, tmp / f"{r}.port") for r in ("model-owner", "dealer")}
        write_config(tmp / "session.toml", ids, eps, timeout_s, connect_timeout_s=min(60.0, timeout_s))
        np.save(tmp / "input.npy", x)
        base = [sys.executable, "-m", "privmed.cli.main", "party", "--config", str(tmp / "session.toml")]
        extra = {
            "data-owner": ["--input", str(tmp / "input.npy"), "--output", str(tmp / "output.npy"), "--progress-jsonl"]
            + (["--chunk", str(chunk)] if chunk else [])
            + (["--expect-plan", expect_plan] if expect_plan else []),
            "model-owner": ["--model", str(model_path)]
            + (["--calibration", str(calibration)] if calibration else [])
            + (["--frac-bits", str(frac_bits)] if frac_bits else [])
            + (["--input-shape", ",".join(map(str, input_shape))] if input_shape else []),
            "dealer": [],
        }
        # three processes share the machine: one BLAS thread each avoids spinning threads
        # fighting over the cores (measured: 56 -> 34 CPU-seconds for DenseNet-121 on 2 cores)
        threads = os.environ.get("PRIVMED_BLAS_THREADS", "1")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
        procs = {
            role: subprocess.Popen(
                base + ["--role", role, "--stats", str(tmp / f"{role}.stats.json")] + extra[role],
                stdout=subprocess.PIPE if role == "data-owner" else subprocess.DEVNULL,
                stderr=open(tmp / f"{role}.err", "wb"),  # noqa: SIM115 - closed with the process
                env=env,
                start_new_session=True,
            )
            for role in ("dealer", "model-owner", "data-owner")
        }
        try:
            _follow(procs, progress, stall_s=stall_s if stall_s is not None else timeout_s * 20)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        codes = {r: p.returncode for r, p in procs.items()}
        if any(codes.values()):
            errs = {r: _first_error((tmp / f"{r}.err").read_text(errors="replace")) for r, c in codes.items() if c}
            for r in codes:  # full stderr of every role with `privmed -v`
                log.debug("%s stderr:\n%s", r, (tmp / f"{r}.err").read_text(errors="replace"))
            # the party that failed first usually names the cause; others report it aborted
            primary = next((r for r, e in errs.items() if "aborted the session" not in e and "lost connection" not in e), next(iter(errs)))
            raise PeerError(f"{primary}: {errs[primary]}" + "".join(f" | {r}: {e}" for r, e in errs.items() if r != primary))
        out = np.load(tmp / "output.npy")
        stats = {r: json.loads((tmp / f"{r}.stats.json").read_text()) for r in ROLES}
    wall = time.perf_counter() - t0
    return SessionResult(out, merge_stats(stats, wall))


def _follow(procs: dict[str, subprocess.Popen], progress: Callable[[dict[str, Any]], None] | None, stall_s: float) -> None:
    """Relay the data owner's progress; stop everyone as soon as one role fails, or when the
    data owner has reported nothing for ``stall_s`` seconds."""
    import selectors

    sel = selectors.DefaultSelector()
    do = procs["data-owner"]
    assert do.stdout is not None
    sel.register(do.stdout, selectors.EVENT_READ)
    buf = b""
    last_news = time.monotonic()
    while True:
        if time.monotonic() - last_news > stall_s:
            raise PeerError(f"the session made no progress for {stall_s:.0f} s (no layer finished); stopped")
        failed = [r for r, p in procs.items() if p.poll() not in (None, 0)]
        if failed:
            time.sleep(0.5)  # let the others record their view of the failure
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
            return
        if all(p.poll() == 0 for p in procs.values()):
            return
        for _key, _ in sel.select(timeout=0.2):
            chunk = os.read(do.stdout.fileno(), 65536)
            if chunk:
                last_news = time.monotonic()
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if progress and line.startswith(b"{"):
                    try:
                        progress(json.loads(line))
                    except (ValueError, PrivmedError):
                        pass
            if not chunk:
                sel.unregister(do.stdout)


def merge_stats(per_role: dict[str, dict[str, Any]], wall_s: float) -> dict[str, Any]:
    """One stats document: totals, per role, and per layer (data owner's view + model owner)."""
    do, mo, de = per_role["data-owner"], per_role["model-owner"], per_role["dealer"]
    mo_layers = {layer["id"]: layer for layer in mo["layers"]}
    dealer_bytes: dict[str, int] = {}
    for entry in de["layers"]:
        key = entry["id"].split("/")[0]
        dealer_bytes[key] = dealer_bytes.get(key, 0) + int(entry.get("bytes_sent", 0))
    layers = []
    for layer in do["layers"]:
        m = mo_layers.get(layer["id"], {})
        dealer = dealer_bytes.get(layer["id"], 0)
        layers.append({
            "id": layer["id"], "op": layer["op"], "onnx": layer["onnx"], "kind": layer.get("kind", ""), "elements": layer["elements"],
            "time_s": max(layer["time_s"], m.get("time_s", 0.0)), "rounds": layer["rounds"],
            "bytes": layer["bytes_sent"] + m.get("bytes_sent", 0) + dealer,
            "bytes_by_role": {"data-owner": layer["bytes_sent"], "model-owner": m.get("bytes_sent", 0), "dealer": dealer},
        })
    batches = []
    for i, b in enumerate(do.get("batches", [])):
        other = sum(s.get("batches", [{}] * (i + 1))[i].get("bytes_sent", 0) for s in (mo, de))
        batches.append({"index": b["index"], "n": b["n"], "time_s": b["time_s"], "rounds": b["rounds"], "bytes": b["bytes_sent"] + other})
    return {
        "wall_s": round(wall_s, 3),
        "batches": batches,
        "online_s": do["wall_s"],
        "bytes_sent": {r: s["bytes_sent"] for r, s in per_role.items()},
        "bytes_total": sum(s["bytes_sent"] for s in per_role.values()),
        "rounds": do["rounds"],
        "peak_rss_mb": {r: s["peak_rss_mb"] for r, s in per_role.items()},
        "cpu_s": {r: s.get("cpu_s", 0.0) for r, s in per_role.items()},
        "plan": do.get("plan", {}),
        "layers": layers,
    }
