"""Benchmark: secure segmentation costs, beside onnxruntime in the same run (not a test).

Part 1 - network costs at the sizes of the issue, with privmed's default U-Net widths
(``privmed.models.zoo``; the weights are a seeded initialisation: time, bytes and rounds do
not depend on their values):

- 2-D U-Net (16, 16, 32, 64, 128, 16) on 256 x 256 slices: ``--slices`` slices of a
  256 x 256 phantom through one secure session (batches of 1) and through onnxruntime;
- 3-D U-Net (8, 8, 16, 32, 64, 8) on one 64^3 patch, the same way (skipped when the machine
  has less than ``--min-free-gb`` available: a 64^3 patch needs ~14 GB over the 3 parties).

Per volume: a 64^3 volume is one patch (measured); larger volumes are projected from the
measured per-slice/per-patch figures (a session streams batches, so cost is linear in them).

Part 2 - whole volumes end to end: small U-Nets trained here (``privmed.segment.training``)
on 64^3 phantoms segment a held-out 64^3 phantom in 2d, tri-axial and 3d modes, secure and
plaintext through the same pipeline: per-volume time/bytes/rounds, Dice secure vs plaintext
and vs the phantom's truth. The masks are saved for ``benchmarks/segment_figure.py``.

    python benchmarks/segment_bench.py [--slices 2] [--skip-3d-patch] [--skip-volumes] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent


def in_child(fn: Any, *args: Any) -> Any:
    """Run ``fn(*args)`` in a fresh interpreter: torch never enters this process.

    Linux keeps a process's peak RSS (ru_maxrss) across fork + exec, and the engine reports
    ru_maxrss per party, so parties started from a process that once held torch (~450 MB)
    would all report at least that much. The launcher therefore stays small.
    """
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def launcher_peak_mb() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("model name")), platform.processor())
    mem = {ln.split(":")[0]: int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()[:3]}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu, "cores": os.cpu_count(),
        "ram_gb": round(mem["MemTotal"] / 2**20, 1), "available_gb": round(mem["MemAvailable"] / 2**20, 1),
        "python": platform.python_version(), "load_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }  # fmt: skip


def export_default(kind: str, side: int, out: Path) -> Path:
    """Default-width zoo U-Net with a final Softmax and CT preprocessing, seeded init."""
    import torch

    from privmed.models.export import export_onnx
    from privmed.models.zoo import build_model
    from privmed.segment.training import ct_preprocess

    path = out / f"{kind}_{side}.onnx"
    if path.exists():
        return path
    dims = 3 if kind == "unet3d" else 2
    torch.manual_seed(0)
    net = torch.nn.Sequential(build_model(kind, 1, 3), torch.nn.Softmax(dim=1)).eval()
    return export_onnx(net, (1, 1) + (side,) * dims, path, ct_preprocess(dims, side),
                       metadata={"privmed.labels": json.dumps(["background", "lung", "lesion"])})  # fmt: skip


def ort_per_item(model: Any, inputs: np.ndarray, repeats: int = 3) -> float:
    from privmed.engines import PlaintextEngine

    PlaintextEngine().run(model.card, inputs[:1])  # warm-up
    times = [PlaintextEngine().run(model.card, inputs).stats.to_dict()["batches"] for _ in range(repeats)]
    return float(np.median([b["time_s"] for run in times for b in run]))


def network_costs(kind: str, side: int, n: int, out: Path, timeout_s: float) -> dict[str, Any]:
    """n slices/patches of a phantom through the secure engine (batches of 1) and onnxruntime."""
    from privmed.cli.progress import LayerProgress
    from privmed.data.synth_ct import ct_phantom
    from privmed.engines import PlaintextEngine, SecureEngine
    from privmed.segment.engines import to_probabilities
    from privmed.segment.model import load_model
    from privmed.segment.pipeline import labels_from, prepare

    model = load_model(in_child(export_default, kind, side, out))
    dims = model.spatial_dims
    depth = max(16, n + 8) if dims == 2 else side
    hu, _ = ct_phantom(np.random.default_rng(1), (depth, side, side))
    prepared = prepare(hu, model, "2d" if dims == 2 else "3d")
    inputs = prepared.inputs[(depth - n) // 2 : (depth - n) // 2 + n] if dims == 2 else prepared.inputs[:n]
    floor = launcher_peak_mb()
    t0 = time.perf_counter()
    run = SecureEngine(chunk=1, timeout_s=timeout_s, progress=LayerProgress(label=f"{kind} {side}")).run(model.card, inputs)
    secure_wall = time.perf_counter() - t0
    plain = PlaintextEngine().run(model.card, inputs)
    st = run.stats.to_dict()
    batches = st["batches"]
    p_sec, p_ort = to_probabilities(run.outputs, model.final), to_probabilities(plain.outputs, model.final)
    same = float(np.mean([np.mean(labels_from(a) == labels_from(b)) for a, b in zip(p_sec, p_ort, strict=True)]))
    return {
        "network": kind, "features": "zoo default", "input": list(model.input_shape), "items": n,
        "work_elements": model.work_elements,
        "per_item": {"time_s": float(np.mean([b["time_s"] for b in batches])),
                     "bytes": float(np.mean([b["bytes"] for b in batches[1:] or batches])),
                     "rounds": int(np.median([b["rounds"] for b in batches]))},
        "first_item_bytes": batches[0]["bytes"], "outside_batches_bytes": st["bytes_total"] - sum(b["bytes"] for b in batches),
        "session": {"wall_s": round(secure_wall, 2), "online_s": st["online_s"], "bytes_total": st["bytes_total"],
                    "rounds": st["rounds"], "peak_rss_mb": st["peak_rss_mb"], "cpu_s": st["cpu_s"],
                    "frac_bits": st.get("plan", {}).get("frac_bits"), "launcher_peak_rss_mb": floor},
        "onnxruntime_per_item_s": ort_per_item(model, inputs),
        "max_abs_prob_diff": float(np.abs(p_sec - p_ort).max()), "argmax_agreement": same,
    }  # fmt: skip


def train_volume_models(out: Path) -> dict[str, Path]:
    import torch

    from privmed.data.synth import synth_ct_study
    from privmed.segment.training import train_unet

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    study = out / "study64"
    if not (study / "dataset.json").exists():
        synth_ct_study(study, n_volumes=8, shape=(64, 64, 64), seed=0, sites=2)
    models = {"2d": out / "vol_unet2d_64.onnx", "3d": out / "vol_unet3d_32.onnx"}
    if not models["2d"].exists():
        r = train_unet(study, "tri-axial", models["2d"], side=64, features=(8, 8, 16, 16, 32, 8), epochs=10, batch_size=32, lr=1e-2, patience=4)
        print(f"trained tri-axial 2-D U-Net: tune Dice {r.tune_dice} after {r.epochs_run} epochs", flush=True)
    if not models["3d"].exists():
        r = train_unet(study, "3d", models["3d"], side=32, features=(4, 4, 8, 8, 16, 4), epochs=12, batch_size=8, lr=1e-2, per_volume=16, patience=4)
        print(f"trained 3-D U-Net: tune Dice {r.tune_dice} after {r.epochs_run} epochs", flush=True)
    return models


def volume_runs(out: Path, timeout_s: float) -> dict[str, Any]:
    from privmed.cli.progress import LayerProgress
    from privmed.data.synth_ct import CT_SITES, ct_affine, ct_phantom
    from privmed.engines import PlaintextEngine, SecureEngine
    from privmed.evaluate.masks import dice
    from privmed.segment.model import load_model
    from privmed.segment.pipeline import segment_volume
    from privmed.segment.summary import cost_summary, volume_summary
    from privmed.segment.volume import voxel_ml

    models = in_child(train_volume_models, out)
    hu, truth = ct_phantom(np.random.default_rng(2024), (64, 64, 64), CT_SITES[0])
    hu = np.rint(hu).astype(np.float32)
    ml = voxel_ml(ct_affine((64, 64, 64), CT_SITES[0].spacing))
    results: dict[str, Any] = {"volume": [64, 64, 64], "truth": volume_summary(truth, ("background", "lung", "lesion"), ml)}
    masks = {"hu": hu, "truth": truth}
    for mode, key in (("2d", "2d"), ("tri-axial", "2d"), ("3d", "3d")):
        model = load_model(models[key])
        results.setdefault("launcher_peak_rss_mb", {})[mode] = launcher_peak_mb()
        secure = segment_volume(hu, model, SecureEngine(timeout_s=timeout_s, progress=LayerProgress(label=mode)), mode)
        plain = segment_volume(hu, model, PlaintextEngine(), mode)
        masks[f"{mode}_secure"], masks[f"{mode}_plain"] = secure.labels, plain.labels
        results[mode] = {
            "model": models[key].name, "items": secure.n_items, "unit": secure.prepared.unit,
            "secure": cost_summary(secure.run.stats, secure.n_items, secure.prepared.unit),
            "plaintext": cost_summary(plain.run.stats, plain.n_items, plain.prepared.unit),
            "dice_secure_vs_plain": {c: dice(secure.labels == i, plain.labels == i) for i, c in ((1, "lung"), (2, "lesion"))},
            "dice_secure_vs_truth": {c: dice(secure.labels == i, truth == i) for i, c in ((1, "lung"), (2, "lesion"))},
            "voxels_differing": int((secure.labels != plain.labels).sum()),
            "summary_secure": volume_summary(secure.labels, model.classes, ml),
        }  # fmt: skip
        print(f"{mode}: {json.dumps(results[mode]['dice_secure_vs_plain'])} secure wall {results[mode]['secure']['total']['wall_s']:.1f} s", flush=True)
    np.savez_compressed(out / "segment_masks.npz", **masks)
    return results


def project(cost: dict[str, Any], items: int) -> dict[str, float]:
    """Secure cost of ``items`` slices/patches in one session from the measured per-item cost."""
    per = cost["per_item"]
    return {"items": items, "time_s": round(items * per["time_s"], 1),
            "bytes": items * per["bytes"] + cost["outside_batches_bytes"] + (cost["first_item_bytes"] - per["bytes"]),
            "rounds": items * per["rounds"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=2, help="256 x 256 slices through the secure 2-D U-Net")
    ap.add_argument("--skip-3d-patch", action="store_true")
    ap.add_argument("--skip-volumes", action="store_true")
    ap.add_argument("--min-free-gb", type=float, default=16.0)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "segment")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": machine()}
    print(json.dumps(report["machine"]), flush=True)
    c2 = network_costs("unet2d", 256, args.slices, args.out, args.timeout)
    report["unet2d_256"] = {**c2, "per_volume_projected": {
        "2d_256x256x64": project(c2, 64), "2d_256x256x128": project(c2, 128),
        "tri-axial_256x256x128": project(c2, 128 + 256 + 256)}}  # fmt: skip
    print(json.dumps(report["unet2d_256"], indent=1), flush=True)
    if not args.skip_3d_patch:
        free = machine()["available_gb"]
        if free < args.min_free_gb:
            report["unet3d_64"] = {"skipped": f"{free} GB available < {args.min_free_gb} GB"}
        else:
            c3 = network_costs("unet3d", 64, 1, args.out, args.timeout)
            report["unet3d_64"] = {**c3, "per_volume_projected": {"3d_128^3_patch64_overlap0.25": project(c3, 27)}}
        print(json.dumps(report["unet3d_64"], indent=1), flush=True)
    if not args.skip_volumes:
        report["volumes_64"] = volume_runs(args.out, args.timeout)
    report["machine_after"] = machine()
    (args.out / "segment_bench.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"wrote {args.out / 'segment_bench.json'}")


if __name__ == "__main__":
    main()
