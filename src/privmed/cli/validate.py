"""`privmed validate` (secure vs plaintext study on a dataset) and `privmed report`."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    """Add the ``validate`` and ``report`` subcommands."""
    v = subparsers.add_parser(
        "validate",
        help="run a model securely and in clear on a study; compare outputs, AUROC and cost",
        description="For every image of STUDY_DIR: plaintext inference (onnxruntime) and secure "
        "inference (three parties; up to --per-session images share one session), stored in "
        "RESULTS_DIR/results.sqlite as each group finishes. Rerunning resumes where the last "
        "run stopped. Ends by writing the report.",
    )
    v.add_argument(
        "--model",
        required=True,
        type=Path,
        help="model.onnx (with model.preprocess.json next to it)",
    )
    v.add_argument(
        "--data",
        type=Path,
        help="study folder (any layout privmed data inspect reads); required unless --precompute",
    )
    v.add_argument(
        "--out", type=Path, help="results folder (created; reused to resume); required unless --precompute"
    )
    v.add_argument("--workers", type=int, default=1, help="secure sessions at once (default 1)")
    v.add_argument(
        "--per-session",
        type=int,
        default=16,
        metavar="K",
        help="images per secure session: the weights and set-up are paid once per K images "
        "(default 16; 1 = one session per image)",
    )
    v.add_argument("--limit", type=int, default=None, help="only the first N images of the study")
    v.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per secure-session step (default 120)"
    )
    v.add_argument(
        "--retry-errors", action="store_true", help="run images that failed before again"
    )
    v.add_argument(
        "--margin", type=float, default=0.01, help="TOST equivalence margin (default 0.01)"
    )
    v.add_argument(
        "--threshold", type=float, default=0.5, help="label threshold for agreement (default 0.5)"
    )
    v.add_argument("--frac-bits", type=int, help="model owner: fixed-point fractional bits (as `privmed infer --frac-bits`)")
    v.add_argument("--calibration", type=Path, help="model owner: calibration input (.npy), as `privmed infer --calibration`")
    v.add_argument("--expect-plan", metavar="SHA256", help="refuse any plan but this fingerprint (stored with the results)")
    v.add_argument("--no-report", action="store_true", help="skip writing report.html at the end")
    from privmed.cli.infer import add_ot_engine_option, add_parties_option

    add_parties_option(v)
    add_ot_engine_option(v)
    v.add_argument("--precompute", type=int, metavar="N",
                   help="--parties 2: prepare the offline phase of N images (one set each) into --store before the "
                        "study, then stop; no --data or --out")  # fmt: skip
    v.add_argument("--store", type=Path, metavar="DIR",
                   help="--parties 2: precomputed offline material (DIR/data-owner, DIR/model-owner, a local CA in DIR/pki); "
                        "each image uses one set online only if one matches, else computes its offline phase inline; "
                        "--workers 1")  # fmt: skip
    v.set_defaults(func=run_validate)

    r = subparsers.add_parser(
        "report",
        help="(re)build report.html and summary.json from a validation results folder",
        description="Read RESULTS_DIR/results.sqlite and write RESULTS_DIR/report.html and summary.json.",
    )
    r.add_argument("results_dir", type=Path, metavar="RESULTS_DIR")
    r.add_argument("--margin", type=float, default=None, help="override the stored TOST margin")
    r.add_argument(
        "--threshold", type=float, default=None, help="override the stored label threshold"
    )
    r.set_defaults(func=run_report)


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    s = int(round(seconds))
    return (
        f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
        if s >= 3600
        else f"{s // 60:02d}:{s % 60:02d}"
    )


def _progress_printer() -> Any:
    tty = sys.stderr.isatty()

    def show(p: Any) -> None:
        rate = f"{60 * p.rate:.1f} img/min" if math.isfinite(p.rate) else "-"
        line = (f"[{p.done}/{p.total}] {p.failed} failed | {rate} | elapsed {_hms(p.elapsed_s)} "
                f"| ETA {_hms(p.eta_s)} | last {p.last.site}/{p.last.image_id} {p.last.status}")  # fmt: skip
        if tty:
            print(
                "\r\033[K" + line, end="" if p.done < p.total else "\n", file=sys.stderr, flush=True
            )
        else:
            print(line, file=sys.stderr, flush=True)

    return show


def _per_session(costs: dict[str, Any]) -> str:
    """The summary's note on shared sessions (costs are then shares), or "" if none were."""
    k = (costs.get("session_images") or {}).get("median")
    return f", {k:.0f} images per session" if k and k > 1 else ""


def _print_summary(summary: dict[str, Any], html: Path, js: Path) -> None:
    st, c = summary["study"], summary["costs"]
    print(f"{st['n_ok']} images ok, {st['n_error']} failed, {len(st['sites'])} sites")
    for f in summary["findings"]:
        print("  " + f["sentence"])
    for name, m in (summary.get("masks") or {}).items():
        sp = m["secure_vs_plain"]
        print(f"  {name}: secure vs plaintext Dice median {sp['dice']['median']:.4f} (min {sp['dice']['min']:.4f}), "
              f"voxel agreement {100 * m['voxel_agreement']:.3f}%")  # fmt: skip
    med = c["secure_s"]["median"]
    if med is not None:
        mb = (c["bytes_total"]["median"] or 0.0) / 1e6
        rounds = c["rounds"]["median"]
        projected = c["projected_study_s"] if c["projected_study_s"] is not None else float("nan")
        print(f"cost per image: median {med:.2f} s, {mb:.2f} MB, "
              f"{'-' if rounds is None else f'{rounds:.0f}'} rounds; "
              f"projected study time {_hms(projected)} with {c['workers']} worker(s)"
              + _per_session(c))  # fmt: skip
    phases = _phases_per_image(c)
    if phases:
        print(phases)
    print(f"report: {html}\nsummary: {js}")


def _phases_per_image(costs: dict[str, Any]) -> str:
    """Median offline and online time and bytes per image, or "" if the engine did not split them."""
    median = {k: (costs.get(k) or {}).get("median") for k in ("offline_s", "online_s", "offline_bytes", "online_bytes")}
    if median["offline_bytes"] is None or median["online_bytes"] is None:
        return ""
    off_s, on_s = (("-" if t is None else f"{t:.2f} s") for t in (median["offline_s"], median["online_s"]))
    return (f"  of which offline {off_s}, {median['offline_bytes'] / 1e6:.2f} MB; "
            f"online {on_s}, {median['online_bytes'] / 1e6:.2f} MB (medians per image)")  # fmt: skip


def _precompute(args: argparse.Namespace) -> int:
    """``--parties 2 --precompute N --store DIR``: N sets of one image (a study runs one image
    per batch), before the study."""
    from privmed.cli.precompute import precomputed_line
    from privmed.engines import CompileOptions, ModelCard, SecureEngine

    engine = SecureEngine(timeout_s=args.timeout, compile=CompileOptions(args.frac_bits, args.calibration),
                          expect_plan=args.expect_plan, parties=2, store=args.store, ot_engine=args.ot_engine)  # fmt: skip
    stats = engine.precompute(ModelCard.read(args.model.resolve()), args.precompute, 1)
    print(f"plan {stats.plan.fingerprint if stats.plan else '?'} (pin it with --expect-plan)")
    print(precomputed_line(stats, args.precompute, 1, args.store))
    return 0


def _phase_lines(phases: Any) -> list[str]:
    """The two-party run's offline and online costs and what it took from its store."""
    from privmed.cli.precompute import phases_line

    lines = [f"two-party sessions ({phases.sessions}, {phases.batches} images): "
             + phases_line(phases.offline_s, phases.offline_bytes, phases.online_s, phases.online_bytes)]  # fmt: skip
    if phases.store:
        lines.append(f"store {phases.store['dir']}: {phases.precomputed_batches} of {phases.batches} images ran on precomputed "
                     f"sets (online only), {phases.store['left']} sets left")  # fmt: skip
    more = [f"(and {len(phases.notes) - 3} more reasons)"] if len(phases.notes) > 3 else []
    return lines + phases.notes[:3] + more


def run_validate(args: argparse.Namespace) -> int:
    from privmed.cli.infer import check_ot_engine_arg
    from privmed.cli.precompute import check_local_store_args
    from privmed.engines import CompileOptions
    from privmed.errors import InputError
    from privmed.evaluate.report import build_report
    from privmed.evaluate.runner import ValidateOptions, run_validation

    check_ot_engine_arg(args)
    check_local_store_args(args, ("--data", "--out"))
    if args.precompute is not None:
        return _precompute(args)
    if args.data is None or args.out is None:
        raise InputError("--data and --out are required (or --parties 2 --precompute N --store DIR)")
    opts = ValidateOptions(workers=args.workers, limit=args.limit, timeout_s=args.timeout,
                           retry_errors=args.retry_errors, margin=args.margin, threshold=args.threshold,
                           images_per_session=args.per_session, expect_plan=args.expect_plan,
                           compile=CompileOptions(args.frac_bits, args.calibration), parties=args.parties,
                           store=args.store, ot_engine=args.ot_engine)  # fmt: skip
    run = run_validation(args.model, args.data, args.out, opts, progress=_progress_printer())
    print(f"validate: {run.processed} images run now ({run.ok} ok, {run.failed} failed), "
          f"{run.already_done} already stored, {run.total} in study, {_hms(run.elapsed_s)} elapsed")  # fmt: skip
    if run.phases is not None:
        print("\n".join(_phase_lines(run.phases)))
    if args.no_report:
        return 0
    html, js, summary = build_report(args.out)
    _print_summary(summary, html, js)
    return 0


def run_report(args: argparse.Namespace) -> int:
    from privmed.evaluate.report import build_report

    html, js, summary = build_report(args.results_dir, margin=args.margin, threshold=args.threshold)
    _print_summary(summary, html, js)
    return 0
