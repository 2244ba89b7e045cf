"""Benchmark: secure segmentation of a clinical-size CT through the real ``privmed segment`` CLI.

Issue 18. A synthetic chest CT of ``--slices`` x ``--side`` x ``--side`` voxels (default
300 x 512 x 512, 1.0 x 0.7 x 0.7 mm, ``privmed.data.synth_ct.ct_phantom`` with seed 18, in
Hounsfield units) is written as a DICOM CT series (``privmed.data.dicom_make.write_ct_series``,
one file per slice), then segmented by the CLI, which reads the series, resizes every slice
to the model's 256 x 256 input (``segment.pipeline.prepare``) and the probabilities back:

    privmed segment --model unet2d_256.onnx --input SERIES --output mask_MODE.nii.gz
                    --mode MODE --compare-plaintext --stats stats_MODE.json

for each of ``--modes`` (``2d``: the D axial slices; ``tri-axial``: the axial, coronal and
sagittal stacks, each at the network's grid with ``--view-slices grid``: min(D, 256) +
min(H, 256) + min(W, 256) slices, ``segment.views``). For tri-axial, every-slice fusion is run
too, in plaintext: the same CLI with ``--plaintext --view-slices all`` (all D + H + W slices,
onnxruntime) and Dice between that mask and the secure one. The model is privmed's default 2-D U-Net
(``privmed.models.zoo``, features (16, 16, 32, 64, 128, 16)) with a final Softmax, exported
to ONNX from a seeded initialisation exactly as ``benchmarks/segment_bench.py`` does: time,
bytes and rounds do not depend on the weight values (the masks mean nothing clinically; Dice
secure vs plaintext is what is compared). ``--compare-plaintext`` runs onnxruntime on the same
inputs in the same CLI run.

Recorded per mode, from the CLI's own ``--stats`` JSON: secure session wall and online time,
bytes, rounds, peak RSS per role (data owner, model owner, dealer), secure and plaintext
slices per second, Dice secure vs plaintext per class; beside them the wall of the whole
command (reading the series, secure run, plaintext run, writing the mask) and the CLI
process's own peak RSS over the whole command (VmHWM; the CLI process is the data owner, and
after the session it also assembles the probability volumes of both runs, which the
per-role figure, taken at the end of the session, does not see). A class that neither run
labels anywhere gets Dice 1.0 (``privmed.evaluate.masks.dice``); ``voxels_secure`` shows it.

    python benchmarks/segment_ct_clinical.py [--slices 300] [--side 512] [--modes 2d,tri-axial] [--out DIR]

Writes DIR/segment_ct_clinical.json (default DIR: benchmarks/results; a mode not run this time
keeps its record from the file's earlier run, marked ``from_earlier_run``) and keeps the series,
model, masks, stats and CLI logs in DIR/segment_ct_clinical/ (regenerated only when missing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from _paths import shown_args  # noqa: E402
from segment_bench import export_default, in_child, machine  # noqa: E402

SEED = 18
SPACING = (1.0, 0.7, 0.7)  # mm (D, H, W): 300 x 512 x 512 covers 300 x 358 x 358 mm
MODES = ("2d", "tri-axial")


def write_series(folder: Path, slices: int, side: int) -> dict[str, Any]:
    """Seeded phantom (central ``slices`` of a volume of at least 16) as a DICOM CT series."""
    import numpy as np

    from privmed.data.dicom_make import Identity, write_ct_series
    from privmed.data.synth_ct import CTSiteStyle, ct_phantom

    t0 = time.perf_counter()
    depth = max(16, slices)  # ct_phantom needs sides >= 16
    site = CTSiteStyle("clinical", noise=15.0, spacing=SPACING)
    hu, truth = ct_phantom(np.random.default_rng(SEED), (depth, side, side), site)
    start = (depth - slices) // 2
    hu, truth = hu[start : start + slices], truth[start : start + slices]
    t1 = time.perf_counter()
    files = write_ct_series(
        folder,
        hu,
        SPACING,
        Identity(series_description=f"synthetic chest CT {slices}x{side}x{side}"),
    )
    info = {
        "shape": [slices, side, side], "spacing_mm": list(SPACING), "seed": SEED, "files": len(files),
        "bytes_on_disk": sum(f.stat().st_size for f in files), "phantom_s": round(t1 - t0, 1),
        "write_s": round(time.perf_counter() - t1, 1), "hu_range": [float(hu.min()), float(hu.max())],
        "truth_voxels": {"lung": int((truth == 1).sum()), "lesion": int((truth == 2).sum())},
        "generator_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }  # fmt: skip
    (folder / "phantom.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def series(work: Path, slices: int, side: int) -> tuple[Path, dict[str, Any]]:
    folder = work / f"ct_{slices}x{side}x{side}"
    marker = folder / "phantom.json"
    if marker.exists() and len(list(folder.glob("CT*.dcm"))) == slices:
        return folder, {**json.loads(marker.read_text()), "reused": True}
    for old in folder.glob("CT*.dcm"):
        old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    return folder, in_child(
        write_series, folder, slices, side
    )  # a fresh process: the phantom's GBs go with it


# The console script's entry point (privmed.cli.main.main), run in a process that afterwards
# records its own peak RSS (VmHWM): the CLI process is the data owner, and after the session it
# also assembles the probability volumes of the secure and the plaintext run.
CLI = (
    "import sys\n"
    "from pathlib import Path\n"
    "from privmed.cli.main import main\n"
    "rc = main(sys.argv[2:])\n"
    "hwm = next(ln for ln in open('/proc/self/status') if ln.startswith('VmHWM'))\n"
    "Path(sys.argv[1]).write_text(hwm.split()[1])\n"
    "sys.exit(rc)\n"
)


def run_cli(args: list[str], work: Path, tag: str) -> dict[str, Any]:
    """Run ``privmed ARGS``: exit code, wall, the CLI process's peak RSS and its tree's largest."""
    log, hwm = work / f"cli_{tag}.log", work / f"cli_{tag}.vmhwm"
    hwm.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-c", CLI, str(hwm), *args], stdout=out, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 1),
        "cli_peak_rss_mb": round(int(hwm.read_text()) / 1024, 1) if hwm.exists() else None,
        "tree_max_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "log": log,
    }


def source_state() -> dict[str, Any]:
    """The commit and any uncommitted change under src/ (the code each CLI run imports)."""
    import hashlib

    def git(*a: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT.parent), *a], capture_output=True, text=True, check=True
        ).stdout

    try:
        diff = git("diff", "HEAD", "--", "src")
        return {"commit": git("rev-parse", "--short", "HEAD").strip(),
                "src_modified": git("diff", "HEAD", "--name-only", "--", "src").split(),
                "src_diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None}  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None}


def run_mode(
    mode: str, model: Path, folder: Path, work: Path, timeout: float, chunk: int | None
) -> dict[str, Any]:
    stats_path, mask = work / f"stats_{mode}.json", work / f"mask_{mode}.nii.gz"
    stats_path.unlink(missing_ok=True)
    cmd = ["segment", "--model", str(model), "--input", str(folder), "--output", str(mask), "--mode", mode,
           "--compare-plaintext", "--stats", str(stats_path), "--timeout", str(timeout)]  # fmt: skip
    if mode == "tri-axial":
        cmd += ["--view-slices", "grid"]
    if chunk:
        cmd += ["--chunk", str(chunk)]
    load_before = [round(v, 2) for v in os.getloadavg()]
    source = source_state()  # src/ may change between modes on a shared checkout
    print(f"{mode}: privmed {' '.join(cmd)}  (load {load_before})", flush=True)
    cli = run_cli(cmd, work, mode)
    if cli["rc"] != 0 or not stats_path.exists():
        tail = cli["log"].read_text().strip().splitlines()[-3:]
        return {
            "mode": mode,
            "error": f"exit {cli['rc']}",
            "log_tail": tail,
            "cli_wall_s": cli["wall_s"],
        }
    st = json.loads(stats_path.read_text())
    sec, plain = st["costs"], st["plaintext"]
    d, n = st["shape"][0], st["items"]
    sec_wall, plain_wall = sec["total"]["wall_s"], plain["costs"]["total"]["wall_s"]
    return {
        "mode": mode, "source": source, "command": "privmed " + " ".join(shown_args(cmd)), "input_kind": st["kind"], "shape": st["shape"],
        "ct_slices": d, "network_slices": n, "batches": sec["batches"], "batch_size": sec["batch_size"],
        "secure": {
            "wall_s": round(sec_wall, 2), "online_s": round(sec["total"]["online_s"], 2),
            "bytes": sec["total"]["bytes"], "rounds": sec["total"]["rounds"],
            "rounds_per_batch": sec["rounds_per_batch"], "per_network_slice_s": round(sec["per_item"]["time_s"], 3),
            "per_network_slice_bytes": round(sec["per_item"]["bytes"]),
            "bytes_per_ct_slice": round(sec["total"]["bytes"] / d),
            "wall_per_ct_slice_s": round(sec_wall / d, 3),
            "network_slices_per_s": round(n / sec_wall, 4), "ct_slices_per_s": round(d / sec_wall, 4),
            "outside_batches_bytes": sec["outside_batches_bytes"], "first_batch_extra_bytes": sec["first_batch_extra_bytes"],
            "peak_rss_mb": sec.get("peak_rss_mb", {}), "cpu_s": sec.get("cpu_s", {}),
        },
        "plaintext": {
            "wall_s": round(plain_wall, 2), "per_network_slice_s": round(plain["costs"]["per_item"]["time_s"], 4),
            "network_slices_per_s": round(n / plain_wall, 2) if plain_wall else None,
            "ct_slices_per_s": round(d / plain_wall, 2) if plain_wall else None,
        },
        "slowdown_secure_vs_plaintext": round(sec_wall / plain_wall, 1) if plain_wall else None,
        "dice_secure_vs_plaintext": plain["dice_vs_secure"], "voxels_differing": plain["voxels_differing"],
        "max_abs_prob_diff": plain["max_abs_prob_diff"], "pipeline_s": st["seconds"],
        "voxels_secure": {k: v["voxels"] for k, v in st["volumes"]["classes"].items()},
        "cli_wall_s": cli["wall_s"], "cli_peak_rss_mb": cli["cli_peak_rss_mb"],
        "tree_max_peak_rss_mb": cli["tree_max_peak_rss_mb"],
        "load_1_5_15": {"before": load_before, "after": [round(v, 2) for v in os.getloadavg()]},
        **({"grid_vs_all_slices": all_slices(model, folder, work, mask, st["classes"])} if mode == "tri-axial" else {}),
    }  # fmt: skip


def all_slices(model: Path, folder: Path, work: Path, grid_mask: Path, classes: list[str]) -> dict[str, Any]:
    """Tri-axial with every slice of every view, in plaintext, against the secure grid mask."""
    import nibabel as nib
    import numpy as np

    from privmed.evaluate.masks import dice

    mask = work / "mask_tri-axial_all_slices.nii.gz"
    cmd = ["segment", "--model", str(model), "--input", str(folder), "--output", str(mask),
           "--mode", "tri-axial", "--view-slices", "all", "--plaintext"]  # fmt: skip
    print(f"tri-axial, every slice, plaintext: privmed {' '.join(cmd)}", flush=True)
    cli = run_cli(cmd, work, "tri-axial_all_slices")
    if cli["rc"] != 0:
        return {"error": f"exit {cli['rc']}", "log_tail": cli["log"].read_text().strip().splitlines()[-3:]}
    grid = np.asarray(nib.load(str(grid_mask)).dataobj)
    every = np.asarray(nib.load(str(mask)).dataobj)
    return {
        "command": "privmed " + " ".join(shown_args(cmd)), "cli_wall_s": cli["wall_s"],
        "dice_grid_secure_vs_all_slices_plain": {name: dice(grid == i, every == i) for i, name in enumerate(classes) if i > 0},
        "voxels_differing": int((grid != every).sum()), "voxels": int(grid.size),
    }  # fmt: skip


def table(results: list[dict[str, Any]]) -> str:
    head = ("mode", "CT sl.", "net sl.", "secure wall", "s / CT sl.", "CT sl./s", "bytes", "MB / CT sl.",
            "rounds", "peak RSS DO / MO / dealer MB", "CLI RSS", "plain wall", "Dice sec. vs plain", "CLI wall")  # fmt: skip
    rows = [head]
    for r in results:
        if "error" in r:
            rows.append((r["mode"], "error: " + r["error"], *[""] * (len(head) - 2)))
            continue
        s, p = r["secure"], r["plaintext"]
        rss = s["peak_rss_mb"]
        rows.append((
            r["mode"], str(r["ct_slices"]), str(r["network_slices"]), f"{s['wall_s']:.1f} s",
            f"{s['wall_per_ct_slice_s']:.2f}", f"{s['ct_slices_per_s']:.3f}", f"{s['bytes'] / 1e9:.2f} GB",
            f"{s['bytes_per_ct_slice'] / 1e6:.0f}", str(s["rounds"]),
            " / ".join(f"{rss.get(k, 0):.0f}" for k in ("data-owner", "model-owner", "dealer")),
            f"{r['cli_peak_rss_mb'] or 0:.0f} MB", f"{p['wall_s']:.2f} s",
            ", ".join(f"{k} {v:.4f}" + (" (empty)" if not r["voxels_secure"].get(k) else "")
                      for k, v in r["dice_secure_vs_plaintext"].items()),
            f"{r['cli_wall_s']:.0f} s",
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join(
        " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300, help="axial slices of the CT (300)")
    ap.add_argument("--side", type=int, default=512, help="rows = columns of each slice (512)")
    ap.add_argument(
        "--modes", default=",".join(MODES), help="comma-separated, of 2d,tri-axial (both)"
    )
    ap.add_argument(
        "--out", type=Path, default=ROOT / "results", help="result folder (benchmarks/results)"
    )
    ap.add_argument(
        "--chunk", type=int, help="passed to privmed segment --chunk (default: the CLI's own)"
    )
    ap.add_argument("--timeout", type=float, default=900.0, help="privmed segment --timeout (900)")
    args = ap.parse_args()
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"--modes: unknown {', '.join(bad)}; expected some of {', '.join(MODES)}")
    if args.slices < 1 or args.side < 16:
        ap.error("--slices must be >= 1 and --side >= 16 (the phantom's smallest side)")
    work = args.out / "segment_ct_clinical"
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine(), "argv": shown_args(sys.argv[1:])}
    report["source"] = source_state()
    print(json.dumps(report["machine"]), flush=True)
    folder, report["volume"] = series(work, args.slices, args.side)
    print(f"CT series {folder}: {json.dumps(report['volume'])}", flush=True)
    model = in_child(export_default, "unet2d", 256, work)
    report["model"] = {"file": model.name, "network": "unet2d", "features": "zoo default (16, 16, 32, 64, 128, 16)",
                       "input": [1, 1, 256, 256], "final": "Softmax", "classes": ["background", "lung", "lesion"],
                       "weights": "seeded initialisation (torch.manual_seed(0)), as benchmarks/segment_bench.py"}  # fmt: skip
    report["modes"] = {}
    for mode in modes:
        r = run_mode(mode, model, folder, work, args.timeout, args.chunk)
        report["modes"][mode] = r
        print(json.dumps(r), flush=True)
    report["machine_after"] = machine()
    out = args.out / "segment_ct_clinical.json"
    if out.exists():  # modes not run now keep their earlier record (each carries its own source and load)
        earlier = json.loads(out.read_text())
        for mode, record in earlier.get("modes", {}).items():
            if mode not in report["modes"] and earlier.get("volume", {}).get("shape") == report["volume"].get("shape"):
                report["modes"][mode] = {**record, "from_earlier_run": {"machine": earlier.get("machine"), "source": earlier.get("source")}}
    out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(table(list(report["modes"].values())))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
