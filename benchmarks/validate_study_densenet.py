"""Benchmark: `privmed validate` of a trained DenseNet-121 on a 7-site, 1,149-image chest study.

The scale of a published multi-institution validation (7 sites, 1,149 chest radiographs),
with synthetic data and the real CLI, one subprocess per phase:

1. `privmed data synth chest` writes a training set (seed --train-seed, --train-per-site
   images per site, same site styles as the study) and `privmed train --model densenet121`
   trains MONAI DenseNet-121 on it for --epochs epochs (kept cheap: the point is the
   secure/plaintext comparison of a real-sized network, not its accuracy).
2. `privmed data synth chest` writes the study (seed --seed, different from the training
   seed, so no study image is a training image): --sites sites of unequal, seeded sizes
   summing to --images, at --size x --size. The CLI writes the same number of images per
   site, so it is run with the largest site size and every site is then cut to its own size
   (labels.csv rows and image files; an image depends only on (seed, site, index), so the
   kept images are those a per-site run would give, up to the unused age/sex columns).
3. `privmed validate --no-report` (secure and plaintext, --workers 2 --per-session 16 by
   default), then `privmed report`.

Records the wall time of each phase, the training metrics, the per-image costs (secure time,
bytes, rounds) and the statistics per finding in OUT/validate_study_densenet.json (OUT:
benchmarks/results; with --quick, the --work folder) and prints a summary.

    python benchmarks/validate_study_densenet.py [--sites 7] [--images 1149] [--size 224]
        [--workers 2] [--per-session 16] [--train-per-site 32] [--epochs 3] [--work DIR] [--out DIR]
    python benchmarks/validate_study_densenet.py --quick   # 2 sites, 6 images at 64x64, 1 epoch

Everything generated stays in --work (default /tmp/privmed_validate_densenet/<config>);
rerunning reuses the training set, model and study and resumes the stored validation.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _paths import shown, shown_args  # noqa: E402
from segment_bench import machine  # noqa: E402
from segment_ct_clinical import source_state  # noqa: E402
from validate_study import findings_record  # noqa: E402

CLI = "import sys; from privmed.cli.main import main; sys.exit(main(sys.argv[1:]))"


def site_sizes(sites: int, images: int, seed: int) -> list[int]:
    """Unequal site sizes summing to ``images`` (each >= 1): Dirichlet(3) shares, seeded."""
    if images < sites:
        raise SystemExit(f"--images {images}: need at least one image per site ({sites} sites)")
    share = np.random.default_rng([seed, 1149]).dirichlet(np.full(sites, 3.0))
    extra = (images - sites) * share
    sizes = np.floor(extra).astype(int)
    order = np.argsort(-(extra - sizes), kind="stable")  # largest remainders get the rest
    sizes[order[: images - sites - int(sizes.sum())]] += 1
    return [int(n) + 1 for n in sizes]


def run_cli(args: list[str], log: Path) -> float:
    """Run `privmed ARGS` in a fresh interpreter, output to LOG; wall seconds (exit on failure)."""
    t0 = time.perf_counter()
    with log.open("w") as fh:
        rc = subprocess.run(
            [sys.executable, "-c", CLI, *args], stdout=fh, stderr=subprocess.STDOUT
        ).returncode
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"privmed {args[0]} failed (exit {rc}); last lines of {log}:\n{tail}")
    return wall


def cut_sites(study: Path, sizes: dict[str, int]) -> None:
    """Keep the first sizes[site] rows of each site in labels.csv; delete the other images."""
    table = study / "labels.csv"
    with table.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields, rows = reader.fieldnames, list(reader)
    assert fields is not None
    seen = dict.fromkeys(sizes, 0)
    keep = []
    for row in rows:
        site = row["site"]
        if seen[site] < sizes[site]:
            keep.append(row)
            seen[site] += 1
        else:
            (study / "images" / row["Image Index"]).unlink(missing_ok=True)
    if seen != sizes:
        raise SystemExit(f"{table}: expected site sizes {sizes}, found {seen}")
    with table.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(keep)


def synth(out: Path, sites: int, n: int, size: int, seed: int, logs: Path) -> float | None:
    if (out / "labels.csv").exists():
        return None  # reused from an earlier run
    return run_cli(["data", "synth", "chest", "--out", str(out), "--sites", str(sites),
                    "--n", str(n), "--size", str(size), "--seed", str(seed)], logs / f"synth_{out.name}.log")  # fmt: skip


def cost_record(costs: dict[str, Any]) -> dict[str, Any]:
    """Median (and IQR, max) per image of the report's cost summary, in plain units."""

    def stat(d: dict[str, float], nd: int = 4) -> dict[str, float]:
        return {k: round(d[k], nd) for k in ("median", "q1", "q3", "max")}

    return {
        "secure_s": stat(costs["secure_s"]), "online_s": stat(costs["online_s"]),
        "plain_s": stat(costs["plain_s"], 6), "bytes_total": stat(costs["bytes_total"], 0),
        "rounds": stat(costs["rounds"], 1), "session_images": stat(costs["session_images"], 1),
        "bytes_by_role_median": {r: costs["bytes_by_role"][r]["median"] for r in costs["bytes_by_role"]},
        "cpu_s_median": {r: round(costs["cpu_s"][r]["median"], 3) for r in costs["cpu_s"]},
        "peak_rss_mb_median": {r: costs["peak_rss_mb"][r]["median"] for r in costs["peak_rss_mb"]},
        "observed_s_per_image": round(costs["observed_s_per_image"], 3),
        "projected_study_s": round(costs["projected_study_s"], 1),
    }  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sites", type=int, default=7)
    ap.add_argument("--images", type=int, default=1149, help="study images over all sites (1149)")
    ap.add_argument("--size", type=int, default=224, help="image and model input side (224)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--per-session", type=int, default=16, help="images per secure session (16)")
    ap.add_argument(
        "--seed", type=int, default=11, help="study seed; also seeds the site sizes (11)"
    )
    ap.add_argument("--train-seed", type=int, default=1, help="training set and training seed (1)")
    ap.add_argument("--train-per-site", type=int, default=32, help="training images per site (32)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (3; no early stop)")
    ap.add_argument("--batch-size", type=int, default=16, help="training batch size (16)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for training (1)")
    ap.add_argument("--timeout", type=float, default=300, help="validate: seconds per session step")
    ap.add_argument("--work", type=Path, default=None,
                    help="data, model, results database, logs (default /tmp/privmed_validate_densenet/<config>)")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None,
                    help="folder of validate_study_densenet.json (default benchmarks/results; --quick: --work)")  # fmt: skip
    ap.add_argument("--quick", action="store_true",
                    help="test run: 2 sites, 6 images at 64x64, 3 training images per site, 1 epoch")  # fmt: skip
    args = ap.parse_args()
    if args.quick:
        args.sites, args.images, args.size, args.train_per_site, args.epochs = 2, 6, 64, 3, 1
    config = f"{args.sites}s{args.images}i{args.size}px_t{args.train_per_site}e{args.epochs}"
    work: Path = args.work or Path("/tmp/privmed_validate_densenet") / config
    out_dir: Path = args.out or (work if args.quick else HERE / "results")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    started = machine()
    phases: dict[str, float | None] = {}  # None: reused from an earlier run

    # 1. training set and DenseNet-121
    train_data = work / f"train_{args.sites}x{args.train_per_site}_seed{args.train_seed}"
    phases["synth_train_s"] = synth(
        train_data, args.sites, args.train_per_site, args.size, args.train_seed, logs
    )
    model_dir = work / "model"
    model = model_dir / "densenet121.onnx"
    phases["train_s"] = None
    if not model.exists():
        phases["train_s"] = run_cli(["train", "--data", str(train_data), "--model", "densenet121", "--out", str(model_dir),
                                     "--name", "densenet121", "--epochs", str(args.epochs), "--patience", "0",
                                     "--batch-size", str(args.batch_size), "--size", str(args.size),
                                     "--seed", str(args.train_seed), "--threads", str(args.threads)], logs / "train.log")  # fmt: skip
    metrics = json.loads((model_dir / "densenet121.metrics.json").read_text())

    # 2. the study: unequal seeded site sizes
    sizes = site_sizes(args.sites, args.images, args.seed)
    study = work / f"study_{args.sites}s{args.images}_seed{args.seed}"
    if not (study / "labels.csv").exists():
        phases["synth_study_s"] = synth(study, args.sites, max(sizes), args.size, args.seed, logs)
        with (study / "labels.csv").open(newline="", encoding="utf-8") as fh:
            names = list(dict.fromkeys(row["site"] for row in csv.DictReader(fh)))
        cut_sites(study, dict(zip(names, sizes, strict=True)))
    else:
        phases["synth_study_s"] = None

    # 3. validate (secure + plaintext), then report
    results = work / f"results_w{args.workers}k{args.per_session}"
    phases["validate_s"] = run_cli(["validate", "--model", str(model), "--data", str(study), "--out", str(results),
                                    "--workers", str(args.workers), "--per-session", str(args.per_session),
                                    "--timeout", str(args.timeout), "--retry-errors", "--no-report"], logs / "validate.log")  # fmt: skip
    phases["report_s"] = run_cli(["report", str(results)], logs / "report.log")
    summary = json.loads((results / "summary.json").read_text())
    last = (logs / "validate.log").read_text().splitlines()
    done = next((ln for ln in reversed(last) if ln.startswith("validate: ")), "")
    run_now = int(m.group(1)) if (m := re.match(r"validate: (\d+) images run now", done)) else 0
    st, costs = summary["study"], cost_record(summary["costs"])

    record = {
        "date": started["date"], "machine": started, "finished": time.strftime("%Y-%m-%d %H:%M %Z"),
        "load_1_5_15_at_end": [round(v, 2) for v in os.getloadavg()],
        "source": source_state(), "argv": shown_args(sys.argv[1:]),
        "config": {k: (shown(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "full_size": (args.sites, args.images, args.size) == (7, 1149, 224),
        "site_sizes": st["n_per_site"],
        "phases_wall_s": {k: None if v is None else round(v, 1) for k, v in phases.items()},
        "validate_images_run_now": run_now, "validate_line": done,
        "training": {"images": sum(sum(metrics["split"][k].values()) for k in ("train", "tune", "test")),
                     "split": metrics["split"], "epochs_run": metrics["epochs_run"], "seconds": metrics["seconds"],
                     "tune": metrics["tune"], "onnx_bytes": metrics["onnx"]["bytes"]},
        "images_ok": st["n_ok"], "images_error": st["n_error"], "sites": st["sites"],
        "findings": findings_record(summary),
        "costs_per_image": costs,
        "results_dir": shown(results),
    }  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "validate_study_densenet.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")

    c = costs
    print(f"DenseNet-121 at {args.size}x{args.size}: {st['n_ok']} images ok, {st['n_error']} failed, "
          f"{len(st['sites'])} sites {st['n_per_site']}")  # fmt: skip
    print(
        "phases (wall s): "
        + ", ".join(
            f"{k[:-2]} " + ("reused" if v is None else f"{v:.1f}") for k, v in phases.items()
        )
    )
    print(
        f"training: {record['training']['images']} images, {metrics['epochs_run']} epoch(s), {metrics['seconds']} s"
    )
    for f in summary["findings"]:
        print(f"  {f['sentence']}")
    print(f"per image (median): secure {c['secure_s']['median']:.2f} s (online {c['online_s']['median']:.2f} s), "
          f"plaintext {1000 * c['plain_s']['median']:.1f} ms, {c['bytes_total']['median'] / 1e9:.3f} GB, "
          f"{c['rounds']['median']:.0f} rounds, {c['session_images']['median']:.0f} images per session")  # fmt: skip
    print(done)
    if run_now:
        per_img = phases["validate_s"] / run_now  # type: ignore[operator]
        print(f"validate wall {phases['validate_s']:.0f} s for {run_now} images = {per_img:.2f} s per image with "
              f"{args.workers} worker(s); at that rate 1,149 images of this size would take {1149 * per_img / 3600:.1f} h (an extrapolation)")  # fmt: skip
    print(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
