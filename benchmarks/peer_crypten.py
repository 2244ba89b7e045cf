"""Side-by-side peer benchmark (issue 18): privmed vs CrypTen 0.4.1, same ONNX model, same run.

    .venv/bin/python benchmarks/peer_crypten.py [--model smallcnn|densenet121] [--size 224]
        [--repeat 1] [--crypten-threads 1] [--seed 0]

Both systems run three processes on this machine over loopback: privmed's data owner, model
owner and dealer (``privmed.runtime.launch.run_local_session``, the code path of
`densenet121_infer.py`, mutual TLS 1.3), and CrypTen's two parties plus its trusted third party
(``cfg.mpc.provider = "TTP"``, torch.distributed gloo over plain TCP), one after the other,
``--repeat`` times interleaved. Written to ``benchmarks/results/peer_crypten_<model>.json``:
wall time (process start to exit), bytes, rounds and max |secure - onnxruntime| of each, and
the ratios CrypTen / privmed.

Bytes are counted at the socket level: the script re-runs itself in a private network namespace
(``unshare --net``) whose loopback carries nothing but the benchmark's own traffic, and reads
that loopback's transmit counters around each run (IP packets with their TCP/IP headers, each
counted once; privmed's also carry TLS records). Each system's own count is recorded beside it:
privmed's bytes sent by its three roles, and CrypTen's communicator statistics (8 bytes per
element, one "round" per communicator call; see ``crypten.communicator.communicator``).

CrypTen 0.4.1 is installed into its own venv (``benchmarks/.venv-crypten``, git-ignored):
``torch==2.13.0`` first (a local CPU wheel; any other torch spec would pull CUDA), then
``crypten==0.4.1 --no-deps`` and only the packages it imports (numpy, omegaconf, onnx, pyyaml,
scipy): its declared dependencies include the dead ``sklearn`` package, which refuses to install,
and torchvision/tensorboard/pandas, which the ONNX path does not import. Two workarounds, both
applied by this benchmark and its helper `_crypten_party.py`:

1. CrypTen's onnx_converter imports ``torch.onnx._internal.registration``, which torch 2.13 no
   longer has: a stub module with ``registry = None`` is put in ``sys.modules`` before
   ``import crypten``. Only CrypTen's PyTorch-export path reads it; we load ONNX files.
2. CrypTen's converter rejects ONNX ``Identity`` nodes: it loads a copy of the model in which
   each Identity of an initializer became an initializer under the Identity's output name and
   every other Identity was bypassed (its consumers read its input).

The copy also drops a final Sigmoid/Softmax and applies it in the clear to CrypTen's revealed
output, which is what privmed does (the data owner learns the output either way; computing it
securely would charge CrypTen for work privmed does not do).

privmed's model owner compiles the model once before the runs (its plan cache,
``privmed.compiler.cache``, as a vendor compiles a model when deploying it; the compile time
is recorded as ``privmed_plan``), and each privmed run reads the plan back; each CrypTen run
converts the ONNX file itself (inside its wall time), as CrypTen has no such cache.

The machine has 2 cores and is shared: the load average is recorded before and after the run.
Only ratios from one run are meaningful; absolute figures vary 1.5x between runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEMO_MODEL = ROOT / "src" / "privmed" / "assets" / "models" / "chest_smallcnn.onnx"
CRYPTEN_VENV = HERE / ".venv-crypten"
# torch first and alone (local CPU wheel); crypten without its declared deps (see docstring)
CRYPTEN_INSTALL = [["torch==2.13.0"], ["--no-deps", "crypten==0.4.1"],
                   ["numpy", "omegaconf", "onnx", "pyyaml", "scipy"]]
IN_NETNS = "PRIVMED_PEER_NETNS"


def ensure_crypten_venv(venv: Path) -> Path:
    """Create ``venv`` with CrypTen 0.4.1 unless it imports already; return its python."""
    py = venv / "bin" / "python"
    probe = [str(py), str(HERE / "_crypten_party.py"), "--probe"]
    if py.exists() and subprocess.run(probe, capture_output=True, timeout=300).returncode == 0:
        return py
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    for spec in CRYPTEN_INSTALL:
        subprocess.run([str(py), "-m", "pip", "install", "-q", *spec], check=True, timeout=1800)
    done = subprocess.run(probe, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"CrypTen does not import in {venv}:\n{done.stderr[-2000:]}")
    return py


def crypten_versions(py: Path) -> dict[str, str]:
    code = ("import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
            "['crypten', 'torch', 'onnx', 'numpy', 'omegaconf']}))")
    return json.loads(subprocess.run([str(py), "-c", code], capture_output=True, text=True,
                                     check=True, timeout=120).stdout)


def model_path(name: str, size: int, seed: int) -> Path:
    if name == "smallcnn":
        return DEMO_MODEL
    path = HERE / "results" / f"densenet121_{size}.onnx"  # shared with densenet121_infer.py
    if not path.exists():
        sys.path.insert(0, str(HERE))
        from densenet121_infer import export

        path.parent.mkdir(parents=True, exist_ok=True)
        export(path, size, seed)
    return path


def crypten_copy(src: Path, dst: Path) -> str | None:
    """Write ``src`` without Identity nodes and without a final Sigmoid/Softmax to ``dst``.

    Returns the op type of the dropped final activation (applied in the clear later), or None.
    """
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    rename: dict[str, str] = {}
    kept = []
    for node in graph.node:
        if node.op_type != "Identity":
            kept.append(node)
            continue
        source = rename.get(node.input[0], node.input[0])
        if source in inits:  # Identity of a weight: the weight itself under the output's name
            const = numpy_helper.to_array(inits[source])
            graph.initializer.append(numpy_helper.from_array(const, node.output[0]))
            inits[node.output[0]] = graph.initializer[-1]
        else:
            rename[node.output[0]] = source
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = rename.get(name, name)
    outputs = [o.name for o in graph.output]
    final = None
    if len(outputs) == 1 and kept and kept[-1].op_type in ("Sigmoid", "Softmax") \
            and kept[-1].output[0] == outputs[0]:
        final = kept.pop()
        rename[outputs[0]] = final.input[0]
    for out in graph.output:
        out.name = rename.get(out.name, out.name)
    del graph.node[:]
    graph.node.extend(kept)
    onnx.save(model, str(dst))
    return None if final is None else final.op_type


def loopback_tx() -> tuple[int, int]:
    """(bytes, packets) sent on ``lo`` so far, from /proc/net/dev of this network namespace."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name.strip() == "lo":
            f = rest.split()
            return int(f[8]), int(f[9])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this process's reaped children so far: the same measure,
    whole processes from start to exit, for both systems' roles."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def run_privmed(model: Path, x: np.ndarray, timeout_s: float) -> dict[str, Any]:
    from privmed.runtime.launch import run_local_session

    b0, p0, c0 = *loopback_tx(), children_cpu_s()
    t = time.perf_counter()
    result = run_local_session(model, x, timeout_s=timeout_s)
    wall = time.perf_counter() - t
    b1, p1, c1 = *loopback_tx(), children_cpu_s()
    st = result.stats.to_dict()
    return {"outputs": result.outputs, "wall_s": round(wall, 3), "online_s": st["online_s"],
            "loopback_bytes": b1 - b0, "loopback_packets": p1 - p0,
            "own_bytes": st["bytes_total"], "own_bytes_by_role": st["bytes_sent"],
            "rounds": st["rounds"], "cpu_s_total": round(c1 - c0, 3), "own_cpu_s_session": st["cpu_s"],
            "peak_rss_mb": st["peak_rss_mb"]}


def run_crypten(py: Path, model: Path, x: np.ndarray, threads: int, timeout_s: float) -> dict[str, Any]:
    """Two CrypTen parties + its TTP as three processes; every role's stats, or the first error."""
    with tempfile.TemporaryDirectory(prefix="peer-crypten-") as tmp_s:
        tmp = Path(tmp_s)
        np.save(tmp / "input.npy", x)
        env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": str(threads),
               "PYTHONUNBUFFERED": "1"}
        common = ["--model", str(model), "--input", str(tmp / "input.npy"), "--threads", str(threads),
                  "--rendezvous", f"file://{tmp / 'rendezvous'}"]
        roles = ("ttp", "model-owner", "data-owner")
        b0, p0, c0 = *loopback_tx(), children_cpu_s()
        t = time.perf_counter()
        procs = {r: subprocess.Popen(
            [str(py), str(HERE / "_crypten_party.py"), "--role", r, "--stats", str(tmp / f"{r}.json"),
             "--output", str(tmp / "output.npy"), *common],
            stdout=subprocess.DEVNULL, stderr=open(tmp / f"{r}.err", "wb"),  # noqa: SIM115
            env=env, start_new_session=True) for r in roles}
        deadline = time.monotonic() + timeout_s
        try:
            while any(p.poll() is None for p in procs.values()):
                failed = [r for r, p in procs.items() if p.poll() not in (None, 0)]
                if failed or time.monotonic() > deadline:
                    why = f"{failed[0]} exited {procs[failed[0]].returncode}" if failed else f"no end after {timeout_s:.0f} s"
                    tails = {r: (tmp / f"{r}.err").read_text(errors="replace")[-1500:] for r in roles}
                    raise RuntimeError(f"CrypTen run failed: {why}\n" + "\n".join(f"--- {r}:\n{e}" for r, e in tails.items()))
                time.sleep(0.05)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        wall = time.perf_counter() - t
        b1, p1, c1 = *loopback_tx(), children_cpu_s()
        stats = {r: json.loads((tmp / f"{r}.json").read_text()) for r in roles}
        out = np.load(tmp / "output.npy")
    parties = ("model-owner", "data-owner")
    return {"outputs": out, "wall_s": round(wall, 3),
            "online_s": max(stats[r]["online_s"] for r in parties),
            "setup_s": max(stats[r]["setup_s"] for r in parties),
            "loopback_bytes": b1 - b0, "loopback_packets": p1 - p0,
            # CrypTen's own count: each party counts what it sends and receives, so half the sum
            "own_bytes": int(sum(stats[r]["comm"]["bytes"] for r in parties) / 2),
            "own_comm": {r: stats[r]["comm"] for r in roles},
            "rounds": max(int(stats[r]["comm"]["rounds"]) for r in parties),
            "cpu_s_total": round(c1 - c0, 3), "cpu_s": {r: stats[r]["cpu_s"] for r in roles},
            "peak_rss_mb": {r: stats[r]["peak_rss_mb"] for r in roles}}


def apply_final(op: str | None, y: np.ndarray) -> np.ndarray:
    if op == "Sigmoid":
        return 1.0 / (1.0 + np.exp(-y))
    if op == "Softmax":
        e = np.exp(y - y.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)
    return y


def enter_netns() -> None:
    """Re-run this script in a private network namespace (root), so loopback counts are ours."""
    if os.environ.get(IN_NETNS) or shutil.which("unshare") is None:
        return
    cmd = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
           sys.executable, *sys.argv]
    sys.exit(subprocess.run(cmd, env={**os.environ, IN_NETNS: "1"}).returncode)


def privmed_source() -> dict[str, Any]:
    """Which privmed was measured: the work tree is shared, so say whether src/ had edits."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout.strip()
    return {"commit": git("rev-parse", "--short", "HEAD"), "src_modified": bool(git("status", "--porcelain", "--", "src"))}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def fmt_bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smallcnn", "densenet121"], default="smallcnn")
    ap.add_argument("--size", type=int, default=224, help="DenseNet-121 input size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1, help="interleaved runs of each system")
    ap.add_argument("--crypten-threads", type=int, default=1,
                    help="torch threads per CrypTen process (privmed uses 1 BLAS thread each)")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--venv", type=Path, default=CRYPTEN_VENV)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    args = ap.parse_args()

    if not os.environ.get(IN_NETNS):  # network access (pip) and export before the namespace
        ensure_crypten_venv(args.venv)
        model_path(args.model, args.size, args.seed)
    enter_netns()
    import onnxruntime as ort

    cpy = ensure_crypten_venv(args.venv)
    model = model_path(args.model, args.size, args.seed)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[0].shape]
    x = np.random.default_rng(args.seed).standard_normal(shape).astype(np.float32)
    ref = sess.run(None, {sess.get_inputs()[0].name: x})[0]
    load_before = loadavg()
    print(f"{args.model} {shape}: load average {load_before} before the run "
          f"(2-core machine shared with other engineers' jobs)", flush=True)

    source = privmed_source()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="peer-model-") as tmp:
        cmodel = Path(tmp) / "crypten_copy.onnx"
        final_op = crypten_copy(model, cmodel)
        # privmed's model owner compiles a model once (its plan cache, compiler/cache.py), as a
        # vendor does when it deploys it: compiled here, cold, into a fresh cache; every run below
        # then reads the plan back. CrypTen has no such step: its runs convert the ONNX each time.
        os.environ["PRIVMED_CACHE_DIR"] = str(Path(tmp) / "plans")
        from privmed.compiler.cache import compile_cached

        t = time.perf_counter()
        compile_cached(model)
        compile_s = round(time.perf_counter() - t, 3)
        print(f"privmed: plan compiled once in {compile_s} s (then read from the plan cache by every run)", flush=True)
        for i in range(args.repeat):
            pm = run_privmed(model, x, timeout_s=args.timeout / 3)
            load_mid = loadavg()
            cr = run_crypten(cpy, cmodel, x, args.crypten_threads, args.timeout)
            pm["max_abs_err"] = float(np.max(np.abs(pm.pop("outputs") - ref)))
            cr["max_abs_err"] = float(np.max(np.abs(apply_final(final_op, cr.pop("outputs")) - ref)))
            ratios = {k: round(cr[k] / pm[k], 2) for k in ("wall_s", "online_s", "cpu_s_total", "loopback_bytes", "rounds")}
            runs.append({"run": i, "load_after_privmed": load_mid, "load_after_crypten": loadavg(),
                         "privmed": pm, "crypten": cr, "ratio_crypten_over_privmed": ratios})
            print(f"run {i}: privmed {pm['wall_s']:.2f} s, {fmt_bytes(pm['loopback_bytes'])}, {pm['rounds']} rounds, "
                  f"err {pm['max_abs_err']:.1e} | CrypTen {cr['wall_s']:.2f} s, {fmt_bytes(cr['loopback_bytes'])}, "
                  f"{cr['rounds']} rounds, err {cr['max_abs_err']:.1e} | ratio {ratios} | load {loadavg()}", flush=True)

    med = {k: statistics.median(r["ratio_crypten_over_privmed"][k] for r in runs) for k in runs[0]["ratio_crypten_over_privmed"]}
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} ({cpu_model()}), {os.cpu_count()} cores, Python {platform.python_version()}",
        "privmed": source,
        "model": args.model, "model_file": str(model.relative_to(ROOT)), "input": shape,
        "load_average_before": load_before, "load_average_after": loadavg(),
        "note": ("shared 2-core machine: other engineers' jobs ran alongside; compare ratios, not absolute "
                 "times. Load averages taken after a run include the benchmark's own three processes."),
        "crypten": {"versions": crypten_versions(cpy), "provider": "TTP", "threads_per_process": args.crypten_threads,
                    "final_activation_in_clear": final_op},
        "bytes_counted": "IP packets on the private namespace's loopback, headers included, each counted once",
        "rounds_counted": "privmed: data owner's rounds; CrypTen: communicator calls of its busier party",
        "privmed_plan": {"compiled_once_before_the_runs_s": compile_s,
                         "note": "each privmed run reads the compiled plan from the model owner's plan cache"},
        "median_ratio_crypten_over_privmed": med,
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    dest = args.out / f"peer_crypten_{args.model}.json"
    dest.write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
    print(f"written to {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")


if __name__ == "__main__":
    main()
