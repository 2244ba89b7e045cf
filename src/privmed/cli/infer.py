"""`privmed infer`, `privmed party`, `privmed certs`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from privmed.cli.pacs import add_pacs_options
from privmed.engines import ModelCard
from privmed.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="secure inference: three parties on this machine over mutual TLS")
    p.add_argument("--model", type=Path, help="ONNX model (the model owner's secret); not with --service")
    p.add_argument("--service", type=Path, metavar="SESSION_TOML",
                   help="use a vendor's model owner and dealer services (addresses in this session file) instead of "
                        "running all three roles here; the hospital only connects out")
    p.add_argument("--model-name", help="with --service: the model's name at the vendor's service")
    p.add_argument("--busy-wait", type=float, default=0.0, metavar="SECONDS",
                   help="with --service: while the services are busy, retry for up to this long (default 0: fail at once)")
    p.add_argument("--input", type=Path, nargs="+",
                   help=".npy (N, C, H, W), image files (DICOM, PNG, NIfTI) or folders of them (read recursively, "
                        "sorted); or --from-pacs")
    p.add_argument("--output", type=Path,
                   help="where the data owner writes the output: .npy (float32, one row per input) or .csv "
                        "(one row per image file, one column per model output, named from the model's labels); "
                        "for DICOM inputs also a DICOM SR (TID 1500): result.dcm for one image, or a folder "
                        "(one SR_<SOPInstanceUID>.dcm per image)")
    p.add_argument("--view", metavar="PA[,AP]", help="DICOM radiographs: only these ViewPosition values (others skipped)")
    p.add_argument("--threshold", type=float, default=0.5,
                   help="DICOM SR: a finding is reported present when its probability is at least this (0.5)")
    p.add_argument("--chunk", type=int, default=1, help="images per batch; all batches share one session (default 1)")
    p.add_argument("--stats", type=Path, help="write time/bytes/rounds/memory per role and per layer (JSON)")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each receive, seconds (default 120)")
    p.add_argument("--calibration", type=Path, help="model owner's calibration input (.npy) for the fixed-point scale")
    p.add_argument("--frac-bits", type=int, help="fixed-point fractional bits (default: chosen from calibration, at most 16)")
    p.add_argument("--preprocess", type=Path, help="preprocessing JSON for image inputs (default: <model>.preprocess.json)")
    p.add_argument("--expect-plan", metavar="SHA256", help="refuse any plan but this fingerprint (printed by every run)")
    add_parties_option(p)
    p.add_argument("--precompute", type=int, metavar="N",
                   help="--parties 2: prepare the offline phase of N batches (--chunk images each) into --store, no --input")
    p.add_argument("--store", type=Path, metavar="DIR",
                   help="--parties 2: precomputed offline material (DIR/data-owner, DIR/model-owner, and a local CA in DIR/pki); "
                        "each batch uses one set online only if one matches, else computes its offline phase inline")  # fmt: skip
    add_ot_engine_option(p)
    add_pacs_options(p, job=True)
    p.set_defaults(func=cmd_infer)

    q = sub.add_parser("party", help="run one role of a secure session (for deployments on separate hosts)")
    q.add_argument("--role", required=True, choices=["data-owner", "model-owner", "dealer"])
    q.add_argument("--config", required=True, type=Path, help="session TOML (addresses, certificates, timeouts)")
    q.add_argument("--model", type=Path, help="model owner: the ONNX model")
    q.add_argument("--calibration", type=Path, help="model owner: calibration input (.npy)")
    q.add_argument("--frac-bits", type=int)
    q.add_argument("--input-shape", help="model owner: per-sample input shape C,H,W if the model's is symbolic")
    q.add_argument("--input", type=Path, nargs="+", help="data owner: the input (.npy, images or folders of images)")
    q.add_argument("--preprocess", type=Path)
    q.add_argument("--output", type=Path, help="data owner: output .npy")
    q.add_argument("--chunk", type=int, help="data owner: run the input N in batches of this size, one session")
    q.add_argument("--stats", type=Path, help="this role's stats JSON")
    q.add_argument("--expect-plan", metavar="SHA256", help="data owner: refuse any plan but this fingerprint")
    add_parties_option(q)
    q.add_argument("--precompute", type=int, metavar="N",
                   help="--parties 2, both roles: prepare the offline phase of N batches (--chunk images each, default 1) "
                        "before any image exists, each party keeping its part in --store; no --input")  # fmt: skip
    q.add_argument("--store", type=Path, metavar="DIR",
                   help="--parties 2: this party's directory of precomputed sets; later sessions with the same peer and plan "
                        "run one set per batch online only (each set deleted when used), others compute offline inline")  # fmt: skip
    add_ot_engine_option(q)
    q.add_argument("--progress-jsonl", action="store_true", help=argparse.SUPPRESS)
    q.set_defaults(func=cmd_party)

    c = sub.add_parser("certs", help="a small CA for the three parties")
    csub = c.add_subparsers(dest="certs_cmd", required=True)
    ci = csub.add_parser("init", help="create a CA (ca.key, ca.pem) in CA_DIR")
    ci.add_argument("ca_dir", type=Path)
    ci.set_defaults(func=cmd_certs_init)
    cs = csub.add_parser("issue", help="issue a certificate for one party name")
    cs.add_argument("ca_dir", type=Path)
    cs.add_argument("--name", required=True, choices=["data-owner", "model-owner", "dealer"])
    cs.add_argument("--out", type=Path, help="directory for NAME.pem / NAME.key (default CA_DIR)")
    cs.set_defaults(func=cmd_certs_issue)
    from privmed.cli.certs_flow import register_certs

    register_certs(csub)  # request / sign / fingerprint: each party keeps its own key


def add_parties_option(p: argparse.ArgumentParser) -> None:
    """``--parties 2|3`` (shared by infer, party, validate, segment)."""
    p.add_argument("--parties", type=int, choices=[2, 3], default=3,
                   help="3 (default): data owner, model owner and a dealer for correlated randomness; 2: no third "
                        "party (HE linear layers, OT comparisons; slower, see docs/twoparty.md)")  # fmt: skip


def add_ot_engine_option(p: argparse.ArgumentParser) -> None:
    """``--ot-engine`` of the two-party mode (infer, party, validate, segment)."""
    p.add_argument("--ot-engine", choices=["ferret", "iknp"],
                   help="--parties 2: the OT extension, overriding the session file's [session] ot_engine (default "
                        "ferret, silent OT; iknp sends 16 B per OT); both parties must run the same")  # fmt: skip


def check_ot_engine_arg(args: argparse.Namespace) -> None:
    """--ot-engine only where there are two parties."""
    if getattr(args, "ot_engine", None) is not None and args.parties != 2:
        raise InputError(f"--ot-engine {args.ot_engine}: the OT engine is for the two-party mode (--parties 2)")


def load_input(path: Path, model: Path | None, preprocess: Path | None) -> np.ndarray:
    """A float32 batch from .npy, or from an image file through the model's preprocessing."""
    if not path.exists():
        raise InputError(f"{path}: input file not found")
    if path.suffix == ".npy":
        try:
            x = np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise InputError(f"{path}: not a readable .npy array ({exc})") from exc
        if x.dtype.kind != "f":
            raise InputError(f"{path}: expected a float32 array, got {x.dtype}")
        return x.astype(np.float32)
    from privmed.data.preprocess import Preprocess, load_for_model

    pre_path = preprocess or (model.with_suffix(".preprocess.json") if model else None)
    if pre_path is None or not pre_path.exists():
        raise InputError(f"{path}: image input needs the model's preprocessing description ({pre_path or '--preprocess'} not found)")
    pre = Preprocess.from_json(pre_path.read_text())
    return np.asarray(load_for_model(path, pre), dtype=np.float32)


def input_files(paths: list[Path]) -> list[Path]:
    """Files named on the command line, with every folder replaced by its image files.

    A folder contributes every file below it (recursively, hidden files excluded, sorted by
    path) that ``privmed.data.readers`` recognises: by suffix, or DICOM by its DICM marker;
    DICOM objects that are not images (SEG, SR, DICOMDIR, e.g. earlier results) are skipped.
    """
    from privmed.data.dicom_series import is_non_image_file
    from privmed.data.readers import IMAGE_SUFFIXES, image_kind

    files: list[Path] = []
    for path in paths:
        if not path.is_dir():
            files.append(path)
            continue
        found = sorted(
            f for f in path.rglob("*")
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
            and image_kind(f) is not None and not (image_kind(f) == "dicom" and is_non_image_file(f))
        )  # fmt: skip
        if not found:
            raise InputError(f"{path}: no image files in this folder (expected {', '.join(IMAGE_SUFFIXES)} or DICOM)")
        files.extend(found)
    return files


def load_inputs(
    paths: list[Path], model: Path | ModelCard | None, preprocess: Path | None, views: list[str] | None = None
) -> tuple[np.ndarray, list[Path]]:
    """All inputs as one float32 batch (N, ...), and the file behind each row.

    Every file is read before anything runs; if any cannot be read, the error names each one
    (up to 5) and nothing is run. ``views``: keep only DICOM files with one of these
    ViewPosition values (e.g. PA for chest classifiers trained on PA radiographs).
    """
    files = input_files(paths)
    if views:
        from privmed.data.dicom_series import view_position

        kept = [f for f in files if view_position(f) in views]
        if not kept:
            raise InputError(f"no input has ViewPosition {' or '.join(views)} ({len(files)} files looked at)")
        if len(kept) < len(files):
            print(f"{len(files) - len(kept)} of {len(files)} inputs skipped: ViewPosition not {' or '.join(views)}", file=sys.stderr)
        files = kept
    card = ModelCard.read(model) if isinstance(model, Path) else model  # the model is read once, not per file
    per_sample = list(card.input_shape) if card is not None else None
    model = card.path if card is not None else None
    arrays, rows, errors = [], [], []
    for f in files:
        try:
            x = load_input(f, model, preprocess)
        except InputError as exc:
            errors.append(str(exc))
            continue
        if per_sample is not None and list(x.shape) == per_sample:
            x = x[None]  # one sample without its batch axis
        arrays.append(x)
        rows.extend([f] * x.shape[0])
    if errors:
        more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
        raise InputError(f"{len(errors)} of {len(files)} inputs cannot be read, nothing was run: " + "; ".join(errors[:5]) + more)
    shapes = sorted({tuple(a.shape[1:]) for a in arrays})
    if len(shapes) > 1:
        raise InputError(f"inputs have different shapes after preprocessing: {shapes}; give one model input size")
    return np.concatenate(arrays), rows


def write_outputs(path: Path, outputs: np.ndarray, rows: list[Path], model: Path | ModelCard) -> list[Path]:
    """Write ``outputs`` as .npy (plus PATH.inputs.txt naming each row's file) or .csv."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".csv" and outputs.ndim == 2:
        import csv

        card = model if isinstance(model, ModelCard) else ModelCard.read(model)
        labels = list(card.labels) if card.labels else None
        names = labels if labels and len(labels) == outputs.shape[1] else [f"output_{k}" for k in range(outputs.shape[1])]
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["input", *names])
            for f, row in zip(rows, outputs, strict=True):
                writer.writerow([str(f), *(f"{v:.6g}" for v in row)])
        return [path]
    target = path if path.suffix.lower() == ".npy" else path.with_suffix(".npy")
    np.save(target, outputs.astype(np.float32))
    written = [target]
    if len(set(rows)) > 1:
        written.append(target.with_suffix(".inputs.txt"))
        written[-1].write_text("".join(f"{f}\n" for f in rows))
    if target != path:
        raise InputError(
            f"{path}: .csv needs one row per image (outputs of shape (N, K)); the outputs have shape "
            f"{tuple(outputs.shape)} and were written to {', '.join(map(str, written))} instead"
        )
    return written


def cmd_infer(args: argparse.Namespace) -> int:
    if args.output is None and args.precompute is None:
        raise InputError("--output is required (where the data owner writes the output)")
    check_ot_engine_arg(args)
    if args.service is not None:
        if args.parties == 2:
            raise InputError("--service runs with the vendor's dealer service; --parties 2 is for local or `privmed party` sessions")
        from privmed.cli.serve import cmd_infer_service

        return cmd_infer_service(args)
    if args.model is None:
        raise InputError("--model is required (or --service with --model-name)")
    if args.precompute is not None or args.store is not None:
        from privmed.cli.precompute import check_infer_store_args, precompute_local

        check_infer_store_args(args)
        if args.precompute is not None:
            return precompute_local(args)
    if args.from_pacs is not None or args.input is None:
        from privmed.cli.pacs import job_input

        with job_input(args, need_one_series=False) as inputs:  # retrieved into a temporary folder
            args.input, args.from_pacs = inputs, None
            return cmd_infer(args)
    from privmed.cli.dicom_results import check_report_inputs, dicom_output_wanted, write_reports
    from privmed.cli.progress import LayerProgress, summary_table
    from privmed.engines import CompileOptions, SecureEngine

    dicom_out = dicom_output_wanted(args.output)
    if args.output.suffix.lower() not in (".npy", ".csv") and not dicom_out:
        raise InputError(f"{args.output}: --output must end in .npy, .csv or .dcm, or be a folder (DICOM SR per image)")
    if args.to_pacs and not dicom_out:
        raise InputError(f"{args.output}: --to-pacs stores a DICOM SR: give --output result.dcm or a folder")
    if args.chunk < 1:
        raise InputError(f"--chunk: expected at least 1, got {args.chunk}")
    views = [v.strip().upper() for v in args.view.split(",")] if args.view else None
    card = ModelCard.read(args.model)  # read once: input shape, labels, preprocessing
    x, rows = load_inputs(args.input, card, args.preprocess, views)
    if dicom_out:
        check_report_inputs(args.output, rows)  # before any party starts
    if len(set(rows)) > 1:
        print(f"{len(rows)} inputs from {len(set(rows))} files, batches of {args.chunk}, one session", file=sys.stderr)
    engine = SecureEngine(chunk=args.chunk, timeout_s=args.timeout, progress=LayerProgress(),
                          compile=CompileOptions(args.frac_bits, args.calibration), expect_plan=args.expect_plan,
                          parties=args.parties, store=args.store, ot_engine=args.ot_engine)  # fmt: skip
    result = engine.run(card, x)
    print(f"plan {result.stats.plan.fingerprint if result.stats.plan else '?'} (pin it with --expect-plan)")
    if args.stats:
        args.stats.write_text(json.dumps(result.stats.to_dict(), indent=1))
    if dicom_out:
        written = write_reports(args.output, result.outputs, rows, args.model, result.stats, args.threshold)
    else:
        written = write_outputs(args.output, result.outputs, rows, card)
    print(f"output {tuple(result.outputs.shape)} written to {', '.join(map(str, written))} (known to the data owner only)")
    if dicom_out:
        names = list(card.labels) if card.labels else [f"output_{k}" for k in range(result.outputs.shape[1])]
        for report, probs in zip(written, result.outputs, strict=True):
            print(f"{report.name}: " + ", ".join(f"{n} {p:.4f}{' *' if p >= args.threshold else ''}" for n, p in zip(names, probs, strict=True))
                  + f"   (* = reported present, threshold {args.threshold:g})")  # fmt: skip
    if dicom_out and args.to_pacs:
        from privmed.cli.pacs import store_result

        store_result(args, written)
    if result.stats.store:
        from privmed.cli.precompute import session_store_lines

        print("\n".join(session_store_lines(result.stats)))
    print(summary_table(result.stats))
    return 0


def cmd_party(args: argparse.Namespace) -> int:
    from privmed.cli.precompute import check_store_args, store_lines
    from privmed.runtime.config import load_config
    from privmed.runtime.party import run_role

    check_store_args(args)
    check_ot_engine_arg(args)
    kwargs: dict[str, Any] = {}
    if args.parties == 2:
        from privmed.runtime.twoparty_launch import load_config_2p as load_config  # type: ignore[assignment]
        from privmed.runtime.twoparty_launch import run_role_2p as run_role  # type: ignore[assignment]

        kwargs.update(store=args.store, precompute=args.precompute, ot_engine=args.ot_engine)
    cfg = load_config(args.config)
    if args.role == "model-owner":
        if not args.model:
            raise InputError("the model owner needs --model")
        from privmed.compiler.cache import compile_cached

        cal = np.load(args.calibration) if args.calibration else None
        shape = [int(s) for s in args.input_shape.split(",")] if args.input_shape else None
        model = args.model
        if not model.exists():
            raise InputError(f"{model}: model file not found")
        # compiled (or read from the plan cache) once the port is bound (see runtime.party.connect_role)
        kwargs["plan_and_weights"] = lambda: compile_cached(model, calibration=cal, frac_bits=args.frac_bits, input_shape=shape)
    if args.role == "data-owner" and args.precompute is not None:
        kwargs["chunk"] = args.chunk
        kwargs["expect_plan"] = args.expect_plan
        kwargs["on_plan"] = lambda plan: print(f"plan {plan.fingerprint()} accepted (pin it with --expect-plan)", flush=True)
    elif args.role == "data-owner":
        if not args.input or not args.output:
            raise InputError("the data owner needs --input and --output")
        kwargs["x"], _ = load_inputs(args.input, None, args.preprocess)
        kwargs["chunk"] = args.chunk
        kwargs["expect_plan"] = args.expect_plan
        if not args.progress_jsonl:  # (stdout then carries the launcher's JSON lines only)
            kwargs["on_plan"] = lambda plan: print(f"plan {plan.fingerprint()} accepted (pin it with --expect-plan)", flush=True)
        if args.progress_jsonl:
            def emit(done: int, total: int, node: Any, batch: int = 0, batches: int | None = None) -> None:
                event = {"done": done, "total": total, "op": node.op, "onnx": node.attrs.get("onnx", ""), "batch": batch, "batches": batches}
                sys.stdout.write(json.dumps(event) + "\n")
                sys.stdout.flush()
            kwargs["progress"] = emit
    profile_dir = os.environ.get("PRIVMED_PROFILE_DIR")  # developer aid: cProfile each role
    if profile_dir:
        import cProfile

        prof = cProfile.Profile()
        out, stats = prof.runcall(run_role, args.role, cfg, **kwargs)
        prof.dump_stats(str(Path(profile_dir) / f"{args.role}.prof"))
    else:
        out, stats = run_role(args.role, cfg, **kwargs)
    if out is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        np.save(args.output, out)
    if args.stats:
        args.stats.write_text(json.dumps(stats))
    for line in store_lines(stats) if args.parties == 2 else []:
        print(line, file=sys.stderr)
    if args.role == "data-owner" and not args.progress_jsonl and args.precompute is None:
        print(f"output {tuple(out.shape) if out is not None else ()} written to {args.output}")
    return 0


def cmd_certs_init(args: argparse.Namespace) -> int:
    from privmed.crypto.certs import init_ca

    pem = init_ca(args.ca_dir)
    print(f"CA certificate {pem}; keep {args.ca_dir / 'ca.key'} private")
    return 0


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from privmed.crypto.certs import issue

    ident = issue(args.ca_dir, args.name, args.out)
    print(f"{args.name}: certificate {ident.cert}, key {ident.key}, CA {ident.ca}")
    return 0
