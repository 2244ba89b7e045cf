"""OT engines of the two-party mode, measured in one run: IKNP and Ferret silent OT
(``mpc/twoparty/silent_ot``) for random OTs and for the ReLU's offline material.

Both parties run as threads over the in-process transport (as ``twoparty_primitives.py``), so
wall time holds both parties' compute on the shared cores; CPU is per-party thread CPU time;
bytes are what each party sent, 136-byte frame headers included.

Per engine: the set-up (base OTs; for Ferret also the IKNP bootstrap of its base COTs), then
m raw correlated OTs each way (IKNP's rows before the hash; Ferret's extension output), then
m random OTs in each direction at once (``random_ot_both``, as the comparison layer calls
it), then ``offline.relu_offline`` for n ReLUs over Z_2^42 comparing 26 bits (drop 16: the
DenseNet-121 64x64 plan's ReLUs). A "random OT" below is one OT in one direction; its cost
counts both parties (CPU of both, bytes sent by both).

    nice -n 19 .venv/bin/python benchmarks/twoparty_silent_ot.py                 # m = 2^21, n = 2^16
    nice -n 19 .venv/bin/python benchmarks/twoparty_silent_ot.py --large         # also FERRET_LARGE, m = 2^24
    nice -n 19 .venv/bin/python benchmarks/twoparty_silent_ot.py --densenet 64   # end to end, both engines

``--densenet SIZE`` runs MONAI DenseNet-121 (exported once, as ``twoparty_modes.py --densenet``)
through ``benchmarks/twoparty_modes.py --modes 2`` (two processes over TLS, the harness of the
docs' 422 s figure) once per engine, one after the other, the engine chosen for both processes
by ``PRIVMED_2P_OT_ENGINE``; writes results/twoparty_silent_ot_densenet121_SIZE.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from privmed.crypto.prg import PRG
from privmed.mpc.twoparty import offline
from privmed.mpc.twoparty.ot import (
    OTSession,
    iknp_cot_recv,
    iknp_cot_send,
    ot_setup,
    random_ot_both,
)
from privmed.mpc.twoparty.silent_ot import (
    FERRET_LARGE,
    FERRET_MEDIUM,
    FerretEngine,
    FerretParams,
    attach_ferret,
)
from privmed.net.channel import Channel, in_process_pair

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import shown  # noqa: E402


def two(f0: Callable[[Channel], Any], f1: Callable[[Channel], Any], ch: tuple[Channel, Channel]) -> dict[str, Any]:
    """Run both parties on channels ``ch``; results, wall, CPU and bytes sent per party."""
    out: dict[str, Any] = {}
    before = [c.counters.bytes_sent for c in ch]

    def role(i: int, f: Callable[[Channel], Any]) -> None:
        try:
            c0 = time.thread_time()
            out[i] = f(ch[i])
            out[f"cpu{i}"] = time.thread_time() - c0
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            out[f"err{i}"] = exc
            ch[i].close()

    threads = [threading.Thread(target=role, args=(i, f)) for i, f in enumerate((f0, f1))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    out["wall"] = time.perf_counter() - start
    for i in (0, 1):
        if f"err{i}" in out:
            raise out[f"err{i}"]
    out["bytes"] = tuple(c.counters.bytes_sent - b for c, b in zip(ch, before, strict=True))
    return out


def _row(r: dict[str, Any], count: int) -> dict[str, Any]:
    cpu = r["cpu0"] + r["cpu1"]
    return {
        "wall_s": round(r["wall"], 3), "cpu_s": [round(r["cpu0"], 3), round(r["cpu1"], 3)], "bytes": list(r["bytes"]),
        "count": count, "us_cpu_per": round(cpu / count * 1e6, 4), "us_wall_per": round(r["wall"] / count * 1e6, 4),
        "bytes_per": round(sum(r["bytes"]) / count, 4),
    }  # fmt: skip


def measure(engine: str, params: FerretParams | None, m: int, n_relu: int) -> dict[str, Any]:
    ch = in_process_pair("data-owner", "model-owner", os.urandom(16), 1200)
    sessions: dict[int, OTSession] = {}

    def setup(i: int) -> Callable[[Channel], None]:
        def run(c: Channel) -> None:
            prg = PRG.fresh()
            sessions[i] = ot_setup(c, "bench", prg, i == 0)
            if params is not None:
                attach_ferret(sessions[i], prg, i == 0, params)
        return run

    result: dict[str, Any] = {"engine": engine, "params": None if params is None else params.__dict__}
    result["setup"] = _row(two(setup(0), setup(1), ch), 1)
    choices = [PRG.fresh().stream("c").bits(m) for _ in range(2)]

    def cot(i: int) -> Callable[[Channel], None]:
        """Raw COTs, m each way, no hash: IKNP's rows (receiver's matrix first), Ferret's
        buffers (sender's extensions first)."""

        def run(c: Channel) -> None:
            engine = sessions[i].silent
            if isinstance(engine, FerretEngine):
                engine.sender.take(m)
                engine.receiver.take(m)
            else:
                iknp_cot_recv(sessions[i], "c", choices[i])
                iknp_cot_send(sessions[i], "c", m)
        return run

    result["cot"] = _row(two(cot(0), cot(1), ch), 2 * m)

    def rot(i: int) -> Callable[[Channel], None]:
        return lambda c: (random_ot_both(sessions[i], "r", choices[i], m), None)[1]

    result["random_ot"] = _row(two(rot(0), rot(1), ch), 2 * m)

    def relu(i: int) -> Callable[[Channel], None]:
        return lambda c: (offline.relu_offline(sessions[i], "relu", i == 0, n_relu, 42, PRG.fresh().stream("s"), 16), None)[1]

    result["relu_offline"] = _row(two(relu(0), relu(1), ch), n_relu)
    print(json.dumps(result), flush=True)
    return result


def densenet_ab(size: int, engines: list[str], out: Path, timeout: float, tag: str) -> None:
    """Both engines end to end on DenseNet-121 at size x size (module docstring)."""
    from densenet121_infer import export  # type: ignore[import-not-found]

    work = out.parent / f"silent_ot_densenet121_{size}"
    work.mkdir(parents=True, exist_ok=True)
    model = work / f"densenet121_{size}.onnx"
    if not model.exists():
        export(model, size, 0)
    report: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "model": shown(model), "runs": {}}
    for engine in engines:
        env = {**os.environ, "PRIVMED_2P_OT_ENGINE": engine}
        load = os.getloadavg()
        cmd = [sys.executable, str(Path(__file__).parent / "twoparty_modes.py"), "--model", str(model), "--modes", "2",
               "--timeout", str(timeout), "--out", str(work / engine)]  # fmt: skip
        subprocess.run(cmd, env=env, check=True)
        row = json.loads((work / engine / f"twoparty_densenet121_{size}.json").read_text())
        report["runs"][engine] = {"load_before": load, **row["modes"]["2-party"]}
        print(f"{engine}: {json.dumps(report['runs'][engine])}", flush=True)
    report["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    path = out.parent / f"twoparty_silent_ot_densenet121_{size}{tag}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"written {shown(path)}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=1 << 21, help="random OTs per direction")
    ap.add_argument("--relu", type=int, default=1 << 16, help="ReLUs for the offline-material run")
    ap.add_argument("--large", action="store_true", help="also FERRET_LARGE (10.6M COTs per extension; ~1 GB of RAM)")
    ap.add_argument("--densenet", type=int, metavar="SIZE", help="DenseNet-121 end to end with both engines instead")
    ap.add_argument("--engines", default="iknp,ferret", help="engines for --densenet, in run order")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per-message deadline for --densenet")
    ap.add_argument("--tag", default="", help="suffix of the --densenet result file (a second sitting keeps the first)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "twoparty_silent_ot.json")
    args = ap.parse_args()
    if args.densenet:
        densenet_ab(args.densenet, args.engines.split(","), args.out, args.timeout, args.tag)
        return
    runs: list[tuple[str, FerretParams | None, int]] = [("iknp", None, args.m), ("ferret-medium", FERRET_MEDIUM, args.m)]
    if args.large:
        runs.append(("ferret-large", FERRET_LARGE, max(args.m, 1 << 24)))
    report = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_before": os.getloadavg(), "cores": os.cpu_count(),
        "runs": [measure(name, params, m, args.relu) for name, params, m in runs],
    }  # fmt: skip
    report["load_after"] = os.getloadavg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written {shown(args.out)}")


if __name__ == "__main__":
    main()
