"""`privmed serve model-owner|dealer` (long-running services) and `privmed infer --service`."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run a model owner or dealer service for many data owners (see docs/deploy.md)")
    ssub = p.add_subparsers(dest="serve_role", required=True)
    m = ssub.add_parser("model-owner", help="serve one or more models to the data owners on the allow-list")
    m.add_argument("--config", required=True, type=Path, help="service TOML (listen address, certificates, limits, allow-list)")
    m.add_argument("--model", required=True, action="append", metavar="NAME=PATH",
                   help="an ONNX model served under NAME (repeat for several models)")
    m.add_argument("--calibration", action="append", default=[], metavar="NAME=PATH",
                   help="calibration input (.npy) for model NAME's fixed-point scale")
    m.add_argument("--frac-bits", type=int, help="fixed-point fractional bits for every model (default: from calibration)")
    m.set_defaults(func=cmd_serve)
    d = ssub.add_parser("dealer", help="serve correlated randomness to the sessions model owners open")
    d.add_argument("--config", required=True, type=Path, help="service TOML")
    d.set_defaults(func=cmd_serve)


def _named(items: list[str], flag: str) -> dict[str, Path]:
    from privmed.runtime.service_wire import REQUEST, SCHEMAS

    out: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not SCHEMAS[REQUEST]["model"](name) or not path:
            raise InputError(f"{flag} {item!r}: expected NAME=PATH with NAME of letters, digits, '.', '_', '-' (at most 64)")
        if name in out:
            raise InputError(f"{flag}: {name!r} is given twice")
        out[name] = Path(path)
    return out


def _compile_models(args: argparse.Namespace) -> dict[str, Any]:
    from privmed.compiler.cache import compile_cached
    from privmed.runtime.service_roles import ServedModel

    models = _named(args.model, "--model")
    cals = _named(args.calibration, "--calibration")
    unknown = sorted(set(cals) - set(models))
    if unknown:
        raise InputError(f"--calibration {unknown[0]}: no --model of that name")
    served = {}
    for name, path in models.items():
        if not path.exists():
            raise InputError(f"{path}: model file not found (--model {name}={path})")
        cal = np.load(cals[name], allow_pickle=False) if name in cals else None
        plan, weights = compile_cached(path, calibration=cal, frac_bits=args.frac_bits)
        served[name] = ServedModel(name, plan, weights, plan.fingerprint())
        print(f"model {name}: {path.name}, plan {plan.fingerprint()}", flush=True)
    return served


def _print_record(rec: dict[str, Any]) -> None:
    peer = rec.get("peer", {})
    who = f"{peer.get('role', '?')} {peer.get('org', '')!r} ({str(peer.get('fingerprint', ''))[:15]})"
    sid = str(rec.get("session", "--------"))[:8]
    model = f" model {rec['model']}" if "model" in rec else ""
    if rec.get("outcome") == "ok":
        what = f"ok, {rec.get('images', 0)} images, {rec.get('wall_s', 0):.2f} s, {rec.get('bytes_sent', 0) + rec.get('bytes_recv', 0)} bytes"
    else:
        what = f"{rec.get('outcome')}{' (' + rec['code'] + ')' if 'code' in rec else ''}: {rec.get('error', '')}"
    print(f"session {sid} {who}{model}: {what}", flush=True)


def cmd_serve(args: argparse.Namespace) -> int:
    from privmed.runtime.service import AuditLog
    from privmed.runtime.service_config import load_service_config
    from privmed.runtime.service_roles import DealerService, ModelOwnerService

    role = args.serve_role
    cfg = load_service_config(args.config, role)
    counters: list[Any] = []  # the metrics, once the service exists (they read its slots)

    def on_record(rec: dict[str, Any]) -> None:
        _print_record(rec)
        for metrics in counters:
            metrics.record(rec)

    audit = AuditLog(cfg.audit_log, on_record)
    if role == "model-owner":
        models = _compile_models(args)  # before listening: a broken model stops the start
        service = ModelOwnerService(cfg, models, audit).service
    else:
        service = DealerService(cfg, audit).service
    if cfg.metrics:
        from privmed.runtime.service_metrics import ServiceMetrics

        metrics = ServiceMetrics(role, cfg.max_sessions, lambda: float(service.active))
        port = metrics.serve(*cfg.metrics)
        counters.append(metrics)
        print(f"{role} metrics on http://{cfg.metrics[0]}:{port}/metrics", flush=True)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if stop.is_set():  # a second signal: stop now
            raise KeyboardInterrupt
        stop.set()
        print(f"{signal.Signals(signum).name}: refusing new sessions, finishing {service.active} running", flush=True)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log = f"; audit log {cfg.audit_log}" if cfg.audit_log else ""
    print(f"{role} service listening on {cfg.host}:{service.port} (at most {cfg.max_sessions} sessions{log})", flush=True)
    t0 = time.monotonic()
    service.serve(stop)
    print(f"{role} service stopped after {time.monotonic() - t0:.1f} s", flush=True)
    return 0


def _progress_adapter(progress: Any) -> Any:
    def emit(done: int, total: int, node: Any, batch: int = 0, batches: int | None = None) -> None:
        progress({"done": done, "total": total, "op": node.op, "onnx": node.attrs.get("onnx", ""), "batch": batch, "batches": batches})

    return emit


def cmd_infer_service(args: argparse.Namespace) -> int:
    """`privmed infer --service session.toml --model-name NAME`: the data owner connects out to
    a model owner service and a dealer service."""
    from privmed.cli.infer import load_inputs, write_outputs
    from privmed.cli.progress import LayerProgress, human_bytes
    from privmed.runtime.config import load_config
    from privmed.runtime.service_client import run_service_session

    if args.model is not None:
        raise InputError("--service: the model stays at the vendor; give --model-name NAME, not --model")
    if not args.model_name:
        raise InputError("--service needs --model-name NAME (the name the vendor serves the model under)")
    suffix = args.output.suffix.lower()
    if suffix not in (".npy", ".csv"):
        raise InputError(f"{args.output}: with --service, --output must end in .npy or .csv")
    if args.chunk < 1:
        raise InputError(f"--chunk: expected at least 1, got {args.chunk}")
    if not args.input:
        raise InputError("--service needs --input")
    cfg = load_config(args.service)
    views = [v.strip().upper() for v in args.view.split(",")] if args.view else None
    x, rows = load_inputs(args.input, None, args.preprocess, views)
    if args.busy_wait < 0:
        raise InputError(f"--busy-wait: expected seconds >= 0, got {args.busy_wait}")

    def on_busy(reason: str) -> None:
        print(f"{reason.split(': ', 1)[-1]}; retrying (--busy-wait {args.busy_wait:g})", file=sys.stderr, flush=True)

    out, stats = run_service_session(
        cfg, args.model_name, x, chunk=args.chunk if x.shape[0] > 1 else None, expect_plan=args.expect_plan,
        progress=_progress_adapter(LayerProgress()), busy_wait_s=args.busy_wait, on_busy=on_busy,
    )  # fmt: skip
    print(f"session {stats['session'][:8]}: model {args.model_name}, plan {stats['plan']['fingerprint']} (pin it with --expect-plan)")
    if args.stats:
        args.stats.write_text(json.dumps(stats, indent=1))
    if suffix == ".csv" and out.ndim == 2:
        import csv

        args.output.parent.mkdir(parents=True, exist_ok=True)
        with args.output.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["input", *(f"output_{k}" for k in range(out.shape[1]))])
            for f, row in zip(rows, out, strict=True):
                writer.writerow([str(f), *(f"{v:.6g}" for v in row)])
        written = [args.output]
    else:
        written = write_outputs(args.output, out, rows, Path(args.service))
    print(f"output {tuple(out.shape)} written to {', '.join(map(str, written))} (known to the data owner only)")
    print(f"wall {stats['wall_s']:.2f} s   rounds {stats['rounds']}   sent {human_bytes(stats['bytes_sent'])}   "
          f"received {human_bytes(stats['bytes_recv'])}", file=sys.stderr)  # fmt: skip
    return 0
