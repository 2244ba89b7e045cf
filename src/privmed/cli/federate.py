"""`privmed federate`: federated training with SecAgg+ and DP-SGD (Flower + Opacus).

Subcommands (argument parsing and printing only; the work is ``privmed.federated``):

- ``simulate``  every site of a study as a Flower client on this machine;
- ``certs``     a CA and server certificate for a deployment;
- ``site-key``  a hospital's SuperNode key pair (run at each hospital);
- ``server``    the SuperLink (run on the server machine);
- ``register``  admit a hospital's public key to the running SuperLink;
- ``site``      one hospital's SuperNode (run at each hospital);
- ``run``       submit a run to the SuperLink and write the model and report.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODELS = ("small-cnn", "resnet18", "densenet121")
RECIPES = ("end-to-end", "scatter")
TRAIN_PARAMS = ("all", "norms-head", "head")
DEFAULT_LR = {"end-to-end": 0.05, "scatter": 0.5}


def _schedule(args: argparse.Namespace, smallest_site: int | None) -> tuple[str, int, int, float, str | None]:
    """(recipe, rounds, batch size, lr, why) from the flags; with --dp-epsilon and neither
    --rounds nor --batch-size given, the accountant picks rounds and batch (``plan_dp``)."""
    from privmed.errors import InputError

    recipe = args.recipe or ("scatter" if args.dp_epsilon is not None else "end-to-end")
    lr = args.lr if args.lr is not None else DEFAULT_LR[recipe]
    if args.rounds is None and args.batch_size is None and args.dp_epsilon is not None and smallest_site:
        from privmed.federated.recipes import plan_dp

        plan = plan_dp(args.dp_epsilon, args.dp_delta, smallest_site, max_grad_norm=args.max_grad_norm)
        return recipe, plan.rounds, plan.batch_size, lr, plan.reason
    if args.rounds is None:
        raise InputError(
            "--rounds: required unless --dp-epsilon lets the accountant choose rounds and batch"
            " (simulate; run: with --dp-plan-site-size)"
        )
    return recipe, args.rounds, args.batch_size or 16, lr, None


def _add_training(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small-cnn", choices=MODELS,
                   help="network of the end-to-end recipe (small-cnn)")  # fmt: skip
    p.add_argument("--recipe", default=None, choices=RECIPES,
                   help="scatter: frozen scattering features + DP-trained head (default with --dp-epsilon);"
                        " end-to-end: the whole --model (default without DP)")  # fmt: skip
    p.add_argument("--ema", type=float, default=0.0,
                   help="evaluate and export a moving average of the global weights with this decay per round (0: off)")  # fmt: skip
    p.add_argument("--augment-mult", type=int, default=1,
                   help="augmented views per training image, gradients averaged per image before clipping (1: off)")  # fmt: skip
    p.add_argument("--train-params", default="all", choices=TRAIN_PARAMS,
                   help="parameters local training updates: all (default), norms-head, head")  # fmt: skip
    p.add_argument("--rounds", type=int, default=None,
                   help="federated rounds (with --dp-epsilon and no --rounds/--batch-size: chosen by the accountant)")  # fmt: skip
    p.add_argument("--out", required=True, help="run folder (checkpoints, model.onnx, report)")
    p.add_argument("--image-size", type=int, default=64, help="input side in pixels (64)")
    p.add_argument("--features", default="", help="small-cnn widths, e.g. 8,16,16 (default: zoo)")
    p.add_argument("--norm", default="group", choices=("group", "none", "batch"),
                   help="normalisation: group (default), none (small-cnn; secure-servable), batch (not with DP)")  # fmt: skip
    p.add_argument("--local-epochs", type=int, default=1, help="local epochs per round (1)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="(expected) local batch size (16; with DP and no --rounds: chosen by the accountant)")  # fmt: skip
    p.add_argument("--lr", type=float, default=None,
                   help="local SGD learning rate (end-to-end 0.05, scatter 0.5)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="model initialisation seed (0)")
    sa = p.add_mutually_exclusive_group()
    sa.add_argument("--secagg", dest="secagg", action="store_true", default=True,
                    help="secure aggregation with Flower SecAgg+ (default; needs >= 3 sites)")  # fmt: skip
    sa.add_argument("--no-secagg", dest="secagg", action="store_false",
                    help="INSECURE: the server sees every site's update")  # fmt: skip
    p.add_argument("--secagg-clip", type=float, default=8.0, help="SecAgg+ clipping range (8)")
    p.add_argument("--secagg-threshold", type=float, default=0.67,
                   help="fraction of sites needed to unmask (0.67)")  # fmt: skip
    p.add_argument("--dp-epsilon", type=float, default=None,
                   help="DP-SGD at every site with this total epsilon for the run")  # fmt: skip
    p.add_argument("--dp-delta", type=float, default=1e-5, help="DP delta (1e-5)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="DP per-sample clipping norm (1.0)")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "federate",
        help="federated training with SecAgg+ and DP-SGD (Flower, Opacus)",
        description="Train one model across hospitals without pooling images: Flower "
        "SecAgg+ hides each site's update from the server, Opacus DP-SGD bounds what the "
        "model reveals about any patient. See docs/federated.md.",
    )
    sub = parser.add_subparsers(dest="federate_command", metavar="ROLE")

    p = sub.add_parser("simulate", help="all sites of a study on this machine (Flower simulation)")
    p.add_argument("--data", required=True, help="study folder whose 'site' column defines the clients")
    _add_training(p)
    p.add_argument("--no-baselines", action="store_true", help="skip central / local-only baselines")
    p.add_argument("--cpus", type=int, default=2, help="CPUs for the simulation engine (2)")
    p.set_defaults(func=run_simulate)

    p = sub.add_parser("certs", help="CA + SuperLink certificate for a deployment")
    p.add_argument("--out", required=True, help="folder for ca.crt, server.pem, server.key")
    p.add_argument("--host", action="append", default=None,
                   help="server DNS name or IP in the certificate (repeat; default localhost, 127.0.0.1)")  # fmt: skip
    p.set_defaults(func=run_certs)

    p = sub.add_parser("site-key", help="a hospital's SuperNode key pair (keep SITE.key, send SITE.pub)")
    p.add_argument("--site", required=True, help="this hospital's site name")
    p.add_argument("--out", required=True, help="folder for SITE.key (private) and SITE.pub")
    p.set_defaults(func=run_site_key)

    p = sub.add_parser("register", help="admit hospitals' public keys to the running SuperLink")
    p.add_argument("--superlink", required=True, help="SuperLink HOST:PORT")
    p.add_argument("--ca", required=True, help="ca.crt of the run")
    p.add_argument("keys", nargs="+", help="SITE.pub files from privmed federate site-key (named by file)")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for the SuperLink to become reachable (60)")  # fmt: skip
    p.set_defaults(func=run_register)

    p = sub.add_parser("server", help="run the SuperLink (server machine)")
    p.add_argument("--certs", required=True, help="folder from privmed federate certs")
    p.add_argument("--no-supernode-auth", action="store_true",
                   help="INSECURE: accept any SuperNode that reaches the port (default: registered keys only)")  # fmt: skip
    p.add_argument("--host", default="0.0.0.0", help="listen address (0.0.0.0)")
    p.add_argument("--port", type=int, default=9092, help="HTTPS port for sites and operator (9092)")
    p.add_argument("--state", default=None, help="folder for the SuperLink database (default: memory)")
    p.add_argument("--print", action="store_true", help="print the Flower command and exit")
    p.set_defaults(func=run_server)

    p = sub.add_parser("site", help="run one hospital's SuperNode")
    p.add_argument("--superlink", required=True, help="SuperLink HOST:PORT")
    p.add_argument("--ca", required=True, help="ca.crt of the run")
    p.add_argument("--data", required=True, help="this hospital's study folder")
    p.add_argument("--site", required=True, help="this hospital's site name in the run")
    p.add_argument("--state", required=True, help="folder for this site's privacy ledger")
    p.add_argument("--auth-key", default=None,
                   help="this hospital's SITE.key from privmed federate site-key (needed unless the server runs --no-supernode-auth)")  # fmt: skip
    p.add_argument("--port", type=int, default=9094, help="local ClientAppIo port (9094)")
    p.add_argument("--allow-plain", action="store_true",
                   help="INSECURE: accept runs without SecAgg+")  # fmt: skip
    p.add_argument("--require-dp", action="store_true", help="refuse runs without DP-SGD")
    p.add_argument("--max-epsilon", type=float, default=None, help="refuse runs with a larger epsilon")
    p.add_argument("--dp-total-epsilon", type=float, default=8.0,
                   help="this site's total DP budget over ALL runs on this data set (8); training stops once spent")  # fmt: skip
    p.add_argument("--dp-total-delta", type=float, default=1e-5, help="delta of the total budget (1e-5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for local training (1)")
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for the SuperLink to become reachable (60)")  # fmt: skip
    p.add_argument("--print", action="store_true", help="print the Flower command and exit")
    p.set_defaults(func=run_site)

    p = sub.add_parser("run", help="submit a run to the SuperLink; write model.onnx and report")
    p.add_argument("--superlink", required=True, help="SuperLink HOST:PORT")
    p.add_argument("--ca", required=True, help="ca.crt of the run")
    p.add_argument("--sites", required=True, help="comma-separated site names")
    p.add_argument("--labels", required=True, help="comma-separated finding names, in output order")
    _add_training(p)
    p.add_argument("--secagg-max-weight", type=float, default=1000.0,
                   help=">= the largest site's training images (1000)")  # fmt: skip
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share per site (0.2)")
    p.add_argument("--dp-plan-site-size", type=int, default=None,
                   help="training images at the smallest site, for the accountant to choose rounds and batch")  # fmt: skip
    p.add_argument("--wait", type=float, default=60.0,
                   help="seconds to wait for the SuperLink to become reachable (60)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=24 * 3600.0, help="give up after this many seconds")
    p.set_defaults(func=run_deployment)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _dp(args: argparse.Namespace) -> Any:
    from privmed.federated.config import DPConfig

    if args.dp_epsilon is None:
        return None
    return DPConfig(epsilon=args.dp_epsilon, delta=args.dp_delta, max_grad_norm=args.max_grad_norm)


def _features(text: str) -> tuple[int, ...]:
    from privmed.errors import InputError

    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"--features: expected comma-separated integers, got {text!r}") from None


def _print_result(report: dict[str, Any], paths: dict[str, Path], seconds: float) -> None:
    from privmed.federated.checkpoint import RunDir
    from privmed.federated.report import privacy_line

    final = report.get("final") or {}
    run = RunDir(paths["json"].parent)
    params = sum(int(a.size) for a in run.load_round(0)[1])
    rounds = len(report.get("rounds", []))
    sites = len(report["config"]["sites"].split("|"))
    print(f"{rounds} rounds in {seconds:.0f} s; {params} parameters, {4 * params / 1e6:.2f} MB per"
          f" site update before SecAgg+ masking ({4 * params * rounds * sites / 1e6:.1f} MB of updates in all)")
    print(f"status: {report['status']['state']} {report['status']['message']}".rstrip())
    print(f"pooled AUROC (macro) after round {final.get('round')}: {final.get('pooled_auroc_macro')}")
    for name, b in (report.get("baselines") or {}).items():
        print(f"  {name.replace('_', '-')} baseline: pooled AUROC {b.get('pooled_auroc_macro')}")
    for site, p in sorted((report.get("privacy") or {}).items()):
        print(f"  DP {privacy_line(site, p)} (budget {p['budget']:g})")
    for kind, path in paths.items():
        print(f"{kind}: {path}")


def _on_round(metrics: dict[str, Any]) -> None:
    from privmed.federated.report import round_line

    print(round_line(metrics), flush=True)


def run_simulate(args: argparse.Namespace) -> int:
    from privmed.federated.simulate import prepare_config, simulate
    from privmed.federated.sitedata import summarize_study

    smallest = min(summarize_study(args.data).train_counts.values())
    recipe, rounds, batch_size, lr, why = _schedule(args, smallest)
    config = prepare_config(
        args.data, args.out, model=args.model, rounds=rounds, secagg=args.secagg, dp=_dp(args),
        image_size=args.image_size, features=_features(args.features), norm=args.norm,
        recipe=recipe, train_params=args.train_params, ema=args.ema,
        augment_mult=args.augment_mult,
        local_epochs=args.local_epochs, batch_size=batch_size, lr=lr, seed=args.seed,
        secagg_clip=args.secagg_clip, secagg_threshold=args.secagg_threshold,
    )  # fmt: skip
    started = time.perf_counter()
    print(f"federated simulation: {len(config.sites)} sites {', '.join(config.sites)}; "
          f"SecAgg+ {'on' if config.secagg else 'OFF (insecure)'}; "
          f"DP {'epsilon=' + format(config.dp.epsilon, 'g') if config.dp else 'off'}; recipe {config.recipe}"
          f" (trains {config.train_params} parameters)", flush=True)  # fmt: skip
    if why:
        print(f"DP plan: {why}", flush=True)
    result = simulate(
        args.data, config, args.out, baselines=not args.no_baselines, on_round=_on_round,
        cpus=args.cpus, verbose=bool(getattr(args, "verbose", False)),
    )  # fmt: skip
    if result.report is not None:
        _print_result(result.report, result.paths, time.perf_counter() - started)
    return 0


def run_certs(args: argparse.Namespace) -> int:
    from privmed.federated.deploy import generate_certificates

    paths = generate_certificates(args.out, args.host or ["localhost", "127.0.0.1"])
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def _exec(cmd: list[str], print_only: bool, flwr_home: Path) -> int:
    from privmed.federated.deploy import flower_env

    print(" ".join(cmd), file=sys.stderr if not print_only else sys.stdout, flush=True)
    if print_only:
        return 0
    os.execve(cmd[0], cmd, flower_env(flwr_home))  # the Flower process replaces this one


def run_site_key(args: argparse.Namespace) -> int:
    from privmed.federated.deploy import generate_site_key

    key, pub = generate_site_key(args.out, args.site)
    print(f"private key: {key} (keep it here; give it to privmed federate site --auth-key)")
    print(f"public key: {pub} (send it to the server operator: privmed federate register)")
    return 0


def run_register(args: argparse.Namespace) -> int:
    import tempfile

    from privmed.errors import PeerError
    from privmed.federated.deploy import (
        check_reachable,
        flower_env,
        register_command,
        write_flwr_config,
    )

    check_reachable(args.superlink, args.ca, wait=args.wait)
    with tempfile.TemporaryDirectory(prefix="privmed-flwr-") as home:
        env = flower_env(home)
        write_flwr_config(env["FLWR_HOME"], args.superlink, args.ca)
        for key in args.keys:
            site = Path(key).name.removesuffix(".pub")
            proc = subprocess.run(register_command(key, site), env=env, capture_output=True, text=True, timeout=120)
            text = (proc.stdout + proc.stderr).strip()
            if proc.returncode != 0 or "registered successfully" not in text:
                # Flower prints its error inside a box; keep the lines that carry words
                words = [ln.strip(" │╭╮╰╯─") for ln in text.splitlines()]
                reason = " ".join(w for w in words if w and not w.startswith(("Using SuperLink", "Error"))) or "no output"
                raise PeerError(f"{key}: the SuperLink did not register site {site!r}: {reason}")
            node = text.split("SuperNode ", 1)[1].split()[0] if "SuperNode " in text else "?"
            print(f"registered {site} ({key}) as SuperNode {node}")
    return 0


def run_server(args: argparse.Namespace) -> int:
    from privmed.federated.deploy import superlink_command

    home = Path(args.state or args.certs) / "flower-home"
    cmd = superlink_command(args.certs, host=args.host, port=args.port, state_dir=args.state,
                            supernode_auth=not args.no_supernode_auth)  # fmt: skip
    return _exec(cmd, args.print, home)


def run_site(args: argparse.Namespace) -> int:
    from privmed.federated.deploy import check_reachable, supernode_command
    from privmed.federated.ledger import SiteBudget
    from privmed.federated.sitedata import check_site

    cmd = supernode_command(
        args.superlink, args.ca, data_dir=args.data, site=args.site, state_dir=args.state,
        port=args.port, require_secagg=not args.allow_plain, require_dp=args.require_dp,
        max_epsilon=args.max_epsilon, total_epsilon=args.dp_total_epsilon, total_delta=args.dp_total_delta,
        threads=args.threads, auth_key=args.auth_key,
    )  # fmt: skip
    SiteBudget(args.dp_total_epsilon, args.dp_total_delta).check()
    if not args.print:
        check_site(args.data, args.site)  # fail here, in one line, not inside round 1
        Path(args.state).mkdir(parents=True, exist_ok=True)
        check_reachable(args.superlink, args.ca, wait=args.wait)
    return _exec(cmd, args.print, Path(args.state) / "flower-home")


def run_deployment(args: argparse.Namespace) -> int:
    from privmed.errors import PeerError
    from privmed.federated.checkpoint import RunDir
    from privmed.federated.config import FederatedConfig, SecAggConfig, safe_run_name
    from privmed.federated.deploy import (
        check_reachable,
        flower_env,
        flwr_run_command,
        write_flower_app,
        write_flwr_config,
    )  # fmt: skip
    from privmed.federated.report import build_report, write_report
    from privmed.federated.simulate import export_final_model

    out = Path(args.out).resolve()
    rd = RunDir(out)
    run_name = rd.stored_config().run_name if rd.manifest_path.exists() else safe_run_name(out.name, os.urandom(4).hex())
    smallest = int(args.dp_plan_site_size) if args.dp_plan_site_size else None
    recipe, rounds, batch_size, lr, why = _schedule(args, smallest)
    if why:
        print(f"DP plan: {why}", flush=True)
    config = FederatedConfig(
        model=args.model, rounds=rounds, recipe=recipe, train_params=args.train_params, ema=args.ema, augment_mult=args.augment_mult,
        labels=tuple(s.strip() for s in args.labels.split(",") if s.strip()),
        sites=tuple(s.strip() for s in args.sites.split(",") if s.strip()),
        image_size=args.image_size, features=_features(args.features),
        local_epochs=args.local_epochs, batch_size=batch_size, lr=lr, norm=args.norm,
        test_fraction=args.test_fraction, seed=args.seed, run_name=run_name,
        secagg=SecAggConfig(reconstruction_threshold=args.secagg_threshold,
                            clipping_range=args.secagg_clip, max_weight=args.secagg_max_weight)
        if args.secagg else None,
        dp=_dp(args),
    )  # fmt: skip
    config.check()
    check_reachable(args.superlink, args.ca, wait=args.wait)
    config = rd.open(config)
    app_dir = write_flower_app(out / "flower-app", config, out)
    env = flower_env(out / "flower-home")
    write_flwr_config(env["FLWR_HOME"], args.superlink, args.ca)
    cmd = flwr_run_command(app_dir)
    print(" ".join(cmd), file=sys.stderr, flush=True)
    started = time.perf_counter()
    try:
        subprocess.run(cmd, env=env, cwd=app_dir, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        raise PeerError(f"federated run did not finish within {args.timeout:g} s") from None
    status = rd.status()
    if status.get("state") not in ("complete", "stopped-budget"):
        raise PeerError(
            f"federated run in {out} {status.get('state')}: {status.get('message') or 'no status'}"
            f" (completed rounds: {max(rd.last_round(), 0)}; re-run to resume)"
        )
    onnx_path = export_final_model(rd, config)
    report = build_report(rd, config, baselines=None, onnx_path=onnx_path)
    paths = write_report(rd, report)
    paths["onnx"] = onnx_path
    _print_result(report, paths, time.perf_counter() - started)
    return 0
