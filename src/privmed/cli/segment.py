"""`privmed segment`: a volume through a 2D / tri-axial 2.5D / 3D U-Net, securely; mask out with the input geometry.

Argument parsing and printing only; the work is ``privmed.segment``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from privmed.cli.pacs import add_pacs_options
from privmed.errors import InputError


def _grid(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected D,H,W integers, got {text!r}") from None
    if len(values) != 3 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes D,H,W, got {text!r}")
    return values  # type: ignore[return-value]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="secure segmentation of a CT/MR volume (2D, tri-axial 2.5D or 3D U-Net)",
        description=(
            "Segment a volume with a vendor's U-Net under secure inference: the data owner, the "
            "model owner and a dealer run as three processes over mutual TLS; the mask is revealed "
            "to the data owner only and written with the input's geometry. Prints class volumes "
            "(lesion, lung, infected fraction) and time/bytes/rounds per slice or patch."
        ),
    )
    p.add_argument("--model", required=True, type=Path, help="segmentation ONNX (the model owner's secret)")
    p.add_argument("--input", type=Path, help="NIfTI volume (.nii, .nii.gz) or a DICOM series folder; or --from-pacs")
    p.add_argument("--output", type=Path,
                   help="mask to write: .nii/.nii.gz (label map with the input affine) or, for a DICOM series, "
                        ".dcm (a DICOM Segmentation referencing the series, one segment per class)")
    p.add_argument("--series", metavar="UID", help="DICOM folder with several series: the SeriesInstanceUID to segment")
    p.add_argument("--mode", choices=("auto", "2d", "tri-axial", "3d"), default="auto",
                   help="2d: axial slices; tri-axial: axial+coronal+sagittal fused (2.5D); 3d: sliding-window "
                        "patches (default: 3d for a 3-D model, else 2d)")  # fmt: skip
    p.add_argument("--view-slices", choices=("all", "grid"), default=None,
                   help="tri-axial: all (default) runs every slice of every view; grid resamples a view with more slices "
                        "than the network's side to that many along its slice axis, and back (fewer slices, slightly "
                        "lower agreement with every-slice fusion: docs/segment.md)")  # fmt: skip
    p.add_argument("--patch", type=int, help="3d: patch side (default and only choice for a static model: its input side)")
    p.add_argument("--overlap", type=float, default=0.25, help="3d: fraction of a patch shared with its neighbour (0.25)")
    p.add_argument("--blend", choices=("gaussian", "constant"), default="gaussian",
                   help="3d: weights of overlapping patch predictions (gaussian, sigma = patch/8)")  # fmt: skip
    p.add_argument("--resample", type=_grid, help="3d: resample the volume to D,H,W voxels before patching")
    p.add_argument("--chunk", type=int, help="slices/patches per batch in the one session (default: about 2^18 input values)")
    p.add_argument("--stats", type=Path, help="write volumes, costs and the session's stats (JSON)")
    p.add_argument("--timeout", type=float, default=300.0, help="deadline of each receive, seconds (300)")
    p.add_argument("--expect-plan", metavar="SHA256", help="refuse any plan but this fingerprint (printed by every run)")
    p.add_argument("--calibration", type=Path, help="model owner's calibration input (.npy) for the fixed-point scale")
    p.add_argument("--frac-bits", type=int, help="fixed-point fractional bits (default: chosen from calibration, at most 16)")
    p.add_argument("--preprocess", type=Path, help="preprocessing JSON (default: <model>.preprocess.json)")
    from privmed.cli.infer import add_ot_engine_option, add_parties_option

    add_parties_option(p)
    add_ot_engine_option(p)
    p.add_argument("--precompute", type=int, metavar="N",
                   help="--parties 2: prepare the offline phase of N batches of --chunk slices/patches into --store "
                        "before any volume exists; no --input or --output")
    p.add_argument("--store", type=Path, metavar="DIR",
                   help="--parties 2: precomputed offline material (DIR/data-owner, DIR/model-owner, a local CA in DIR/pki); "
                        "each batch uses one set online only if one matches, else computes its offline phase inline; "
                        "without --chunk, batches take the sets' size")
    p.add_argument("--plaintext", action="store_true",
                   help="INSECURE: run the model with onnxruntime on this machine instead (needs the weights)")  # fmt: skip
    p.add_argument("--compare-plaintext", action="store_true",
                   help="also run onnxruntime on the same inputs and print Dice secure vs plaintext")  # fmt: skip
    add_pacs_options(p, job=True)
    p.set_defaults(func=cmd_segment)


def _dice_table(secure: Any, plain: Any, classes: tuple[str, ...]) -> dict[str, float]:
    from privmed.evaluate.masks import dice

    return {name: dice(secure == i, plain == i) for i, name in enumerate(classes) if i > 0}


def _precompute(args: argparse.Namespace) -> int:
    """``--parties 2 --precompute N --store DIR --chunk K``: N sets for batches of K slices or
    patches (a later run with this store and no --chunk takes K from the sets), before any
    volume exists. K has no default: the run's default (``auto_chunk``) depends on the number
    of slices or patches, unknown here, and its memory bound alone is thousands for small models."""
    from privmed.cli.precompute import precomputed_line
    from privmed.engines import CompileOptions, ModelCard, SecureEngine
    from privmed.segment.engines import auto_chunk
    from privmed.segment.model import load_model

    model = load_model(args.model, args.preprocess, args.patch)
    if args.chunk is None or args.chunk < 1:
        raise InputError(f"--precompute needs --chunk K, the slices or patches per set (at most {auto_chunk(model, 1 << 30)} "
                         "for this model's batch memory), got " + ("none" if args.chunk is None else str(args.chunk)))  # fmt: skip
    chunk = args.chunk
    engine = SecureEngine(timeout_s=args.timeout, compile=CompileOptions(args.frac_bits, args.calibration),
                          expect_plan=args.expect_plan, parties=2, store=args.store, ot_engine=args.ot_engine)  # fmt: skip
    stats = engine.precompute(model.card or ModelCard.read(model.path, model.input_shape), args.precompute, chunk)
    print(f"plan {stats.plan.fingerprint if stats.plan else '?'} (pin it with --expect-plan)")
    print(precomputed_line(stats, args.precompute, chunk, args.store, "patch" if model.spatial_dims == 3 else "slice"))
    if args.stats:
        args.stats.parent.mkdir(parents=True, exist_ok=True)
        args.stats.write_text(json.dumps({"precompute": stats.to_dict()}, indent=1) + "\n")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from privmed.cli.infer import check_ot_engine_arg

    check_ot_engine_arg(args)
    if args.precompute is None and (args.from_pacs is not None or args.input is None):
        from privmed.cli.pacs import job_input

        with job_input(args, need_one_series=True) as folder:  # retrieved into a temporary folder
            args.input, args.from_pacs = folder, None
            return cmd_segment(args)
    import numpy as np

    from privmed.cli.progress import LayerProgress
    from privmed.engines import CompileOptions, PlaintextEngine, SecureEngine
    from privmed.segment import summary
    from privmed.segment.model import load_model
    from privmed.segment.pipeline import segment_volume
    from privmed.segment.volume import check_mask_path, read_volume, write_mask

    t0 = time.perf_counter()
    from privmed.cli.precompute import check_local_store_args

    check_local_store_args(args, ("--input", "--output", "--from-pacs"))
    if args.store is not None and (args.plaintext or args.compare_plaintext):
        raise InputError("--store holds the secure engine's offline material; not with --plaintext or --compare-plaintext")
    if args.precompute is not None:
        return _precompute(args)
    if args.output is None:
        raise InputError("--output is required (the mask to write)")
    check_mask_path(args.output)
    if args.to_pacs and args.output.suffix.lower() != ".dcm":
        raise InputError(f"{args.output}: --to-pacs stores a DICOM SEG: give --output NAME.dcm")
    if args.patch is not None and args.patch < 1:
        raise InputError(f"--patch {args.patch}: expected a positive side")
    if args.calibration is not None and not args.calibration.is_file():
        raise InputError(f"{args.calibration}: calibration file not found")
    if args.plaintext and args.compare_plaintext:
        raise InputError("--plaintext and --compare-plaintext exclude each other")
    model = load_model(args.model, args.preprocess, args.patch)
    mode = args.mode if args.mode != "auto" else ("3d" if model.spatial_dims == 3 else "2d")
    model.check_mode(mode)
    if args.view_slices is not None and mode != "tri-axial":
        raise InputError(f"--view-slices applies to --mode tri-axial only, got --mode {mode}")
    volume = read_volume(args.input, series_uid=args.series)
    if args.output.suffix.lower() == ".dcm" and not volume.kind.startswith("dicom"):
        raise InputError(f"{args.output}: a DICOM SEG needs a DICOM series as --input, got a {volume.kind} file")
    engine: Any
    if args.plaintext:
        engine = PlaintextEngine()
    else:
        engine = SecureEngine(chunk=args.chunk, timeout_s=args.timeout, compile=CompileOptions(args.frac_bits, args.calibration), expect_plan=args.expect_plan,
                              progress=LayerProgress(label=f"secure segmentation ({mode})"), parties=args.parties, store=args.store,
                              ot_engine=args.ot_engine)  # fmt: skip
    side = "x".join(map(str, model.side))
    source = getattr(args, "source_label", None) or volume.source  # what the user named, not a temp folder
    print(f"{engine.name} segmentation: {source} {volume.array.shape} ({volume.kind}), mode {mode}, "
          f"model input {side}", file=sys.stderr)  # fmt: skip
    kwargs = {"overlap": args.overlap, "blend": args.blend, "resample": args.resample,
              "view_slices": args.view_slices or "all"}
    seg = segment_volume(volume.array, model, engine, mode, **kwargs)
    if args.output.suffix.lower() == ".dcm":
        from privmed.cli.dicom_results import write_segmentation

        write_segmentation(args.output, volume.files, seg.labels, model.classes, model.path, seg.run.stats,
                           secure=engine.name == "secure")  # fmt: skip
        what = "slices of the series" if volume.kind == "dicom-series" else "frames of the multi-frame image"
        where = f"as a DICOM SEG over the {seg.labels.shape[0]} {what}"
    else:
        write_mask(args.output, seg.labels, volume.affine)
        where = "with the input affine"
    vols = summary.volume_summary(seg.labels, model.classes, volume.voxel_ml)
    costs = summary.cost_summary(seg.run.stats, seg.n_items, seg.prepared.unit)
    who = "revealed to the data owner only" if engine.name == "secure" else "computed in plaintext"
    print(f"mask {seg.labels.shape} written to {args.output} {where} ({who})")
    if args.to_pacs:
        from privmed.cli.pacs import store_result

        store_result(args, [args.output])
    print(f"volumes (voxel {volume.voxel_ml * 1000:.3f} mm^3):")
    print("\n".join(summary.format_volumes(vols)))
    if seg.run.stats.plan is not None:
        print(f"plan {seg.run.stats.plan.fingerprint} (pin it with --expect-plan)")
    print(f"costs ({engine.name}):")
    print("\n".join(summary.format_costs(costs, engine.name)))
    if seg.run.stats.store:
        from privmed.cli.precompute import session_store_lines

        print("\n".join("  " + line for line in session_store_lines(seg.run.stats)))
    report: dict[str, Any] = {
        "input": str(source), "shape": list(seg.labels.shape), "kind": volume.kind,
        "affine": np.asarray(volume.affine).tolist(), "model": str(model.path), "mode": mode,
        "engine": engine.name, "classes": list(model.classes), "items": seg.n_items,
        "unit": seg.prepared.unit, "volumes": vols, "costs": costs, "seconds": seg.seconds,
        "settings": {"overlap": args.overlap, "blend": args.blend, "patch": list(model.side),
                     "resample": list(args.resample) if args.resample else None, "chunk": args.chunk,
                     "view_slices": kwargs["view_slices"]},
    }  # fmt: skip
    if args.compare_plaintext:
        plain = segment_volume(volume.array, model, PlaintextEngine(), mode, **kwargs)
        dice = _dice_table(seg.labels, plain.labels, model.classes)
        diff = float(np.abs(seg.probabilities - plain.probabilities).max())
        pcosts = summary.cost_summary(plain.run.stats, plain.n_items, plain.prepared.unit)
        print(f"plaintext (onnxruntime, same pre/post-processing): per {pcosts['unit']} "
              f"{pcosts['per_item']['time_s']:.4f} s, total {pcosts['total']['wall_s']:.2f} s")  # fmt: skip
        print("secure vs plaintext: Dice " + ", ".join(f"{k} {v:.4f}" for k, v in dice.items())
              + f"; voxels differing {int((seg.labels != plain.labels).sum())}; max |p - p_plain| {diff:.2e}")  # fmt: skip
        report["plaintext"] = {"costs": pcosts, "dice_vs_secure": dice, "max_abs_prob_diff": diff,
                               "voxels_differing": int((seg.labels != plain.labels).sum())}  # fmt: skip
    if args.stats:
        report["session"] = seg.run.stats.to_dict()
        args.stats.parent.mkdir(parents=True, exist_ok=True)
        args.stats.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
