"""Two versions of the two-party code on DenseNet-121 end to end, in one sitting (A/B).

Each version is a snapshot of the repository (``git archive``) in a temporary folder: B is
``--b`` (default HEAD); A is B with the two-party files (``mpc/twoparty``, ``runtime/twoparty*``,
and the files the same commits changed for the CLI's two-party options) as they were at
``--a``, so that everything else (compiler, executor, network) is the same code in both. Each
run is ``benchmarks/twoparty_modes.py --modes 2`` (two processes over mutual TLS on 127.0.0.1,
the harness of the docs' DenseNet figures) with ``PYTHONPATH`` on the snapshot, in the order
given (``--order a,b,b,a`` by default: each version once early and once late, so a drift of
the machine's load shows as a difference between the two runs of one version).

    nice -n 19 .venv/bin/python benchmarks/twoparty_he_ab.py --size 64 --a 3cbc29a

Writes results/twoparty_he_ab_densenet121_SIZE{--tag}.json: per run the version, its commit,
the load average before and after, wall, offline/online, bytes per role, CPU seconds and peak
RSS per role, rounds, max |secure - onnxruntime|.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from _paths import shown  # noqa: E402

TWO_PARTY = ["src/privmed/mpc/twoparty", "src/privmed/runtime/twoparty.py", "src/privmed/runtime/twoparty_launch.py",
             "src/privmed/runtime/twoparty_precompute.py", "src/privmed/runtime/twoparty_store.py", "src/privmed/runtime/config.py",
             "src/privmed/cli/infer.py", "src/privmed/cli/precompute.py", "src/privmed/cli/validate.py", "src/privmed/cli/segment.py",
             "src/privmed/evaluate/runner.py", "src/privmed/engines.py"]  # fmt: skip


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()


def snapshot(dest: Path, base: str, two_party_from: str | None) -> str:
    """``base`` extracted into ``dest``, the two-party files from ``two_party_from`` if given;
    returns a description of what it holds."""
    dest.mkdir(parents=True)
    subprocess.run(f"git archive {base} | tar -x -C {dest}", shell=True, cwd=ROOT, check=True)
    if two_party_from is None:
        return _git("rev-parse", "--short", base)
    changed = _git("diff", "--name-only", two_party_from, base, "--", *TWO_PARTY).split()
    for path in changed:
        target = dest / path
        if _git("ls-tree", "--name-only", two_party_from, "--", path):
            target.write_bytes(subprocess.run(["git", "show", f"{two_party_from}:{path}"], cwd=ROOT, check=True, capture_output=True).stdout)
        elif target.exists():
            target.unlink()
    return f"{_git('rev-parse', '--short', base)} with the two-party files of {_git('rev-parse', '--short', two_party_from)}"


def run(tree: Path, model: Path, timeout: float, out: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    where = subprocess.run([sys.executable, "-c", "import privmed; print(privmed.__file__)"], env=env, cwd=tree, check=True,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    if not Path(where).is_relative_to(tree):
        raise RuntimeError(f"the snapshot's privmed is not the one imported ({where})")
    subprocess.run([sys.executable, str(tree / "benchmarks" / "twoparty_modes.py"), "--model", str(model), "--modes", "2",
                    "--timeout", str(timeout), "--out", str(out)], env=env, cwd=tree, check=True)  # fmt: skip
    return json.loads((out / f"twoparty_{model.stem}.json").read_text())["modes"]["2-party"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--model", type=Path, help="the DenseNet-121 ONNX file (default: exported here, seed 0)")
    ap.add_argument("--a", default="3cbc29a", help="version A's two-party files (a commit)")
    ap.add_argument("--b", default="HEAD", help="version B (a commit)")
    ap.add_argument("--order", default="a,b,b,a")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="privmed-ab-") as tmp_s:
        tmp = Path(tmp_s)
        model = args.model
        if model is None:
            from densenet121_infer import export  # type: ignore[import-not-found]

            model = tmp / f"densenet121_{args.size}.onnx"
            export(model, args.size, 0)
        trees = {"b": tmp / "b", "a": tmp / "a"}
        what = {"b": snapshot(trees["b"], args.b, None), "a": snapshot(trees["a"], args.b, args.a)}
        report: dict[str, Any] = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "model": f"MONAI DenseNet-121, 1x{args.size}x{args.size}",
                                  "versions": what, "cores": os.cpu_count(), "runs": []}  # fmt: skip
        for i, version in enumerate(args.order.split(",")):
            load = os.getloadavg()
            row = run(trees[version], model, args.timeout, tmp / f"out{i}")
            report["runs"].append({"version": version, "load_before": [round(v, 2) for v in load], **row})
            print(f"{version}: {json.dumps(report['runs'][-1])}", flush=True)
    path = ROOT / "benchmarks" / "results" / f"twoparty_he_ab_densenet121_{args.size}{args.tag}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"written {shown(path)}")


if __name__ == "__main__":
    main()
