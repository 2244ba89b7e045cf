"""`privmed attack`: measure what federated updates leak (argument parsing and printing only).

- ``invert``  gradient inversion on what sites send, for every configuration of batch size
  x DP noise x aggregated sites; scores, grids and the report go to ``--out``.
- ``report``  rebuild the report of an attack folder, e.g. with other federate runs.

The work is in ``privmed.attacks`` (see docs/attacks.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from privmed.errors import InputError

MODELS = ("small-cnn", "resnet18", "densenet121", "scatter")


def _parse_list(text: str, kind: type, what: str) -> tuple[Any, ...]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise InputError(f"{what}: expected a comma-separated list, got {text!r}")
    try:
        return tuple(kind(t) for t in items)
    except ValueError:
        raise InputError(f"{what}: expected {kind.__name__} values, got {text!r}") from None


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "attack",
        help="gradient-inversion attacks on federated updates, scored",
        description="Reconstruct training images from what a federated site sends, with and "
        "without each defence, and score the reconstructions (PSNR, SSIM, leakage relative to "
        "the mean image). See docs/attacks.md.",
    )
    sub = parser.add_subparsers(dest="attack_command", metavar="COMMAND")

    p = sub.add_parser("invert", help="invert updates for every configuration and write a report")
    p.add_argument("--model", required=True, choices=MODELS,
                   help="zoo network trained end to end, or scatter: the scatter recipe (public scattering + the head, "
                   "whose update is attacked; the recipe trains at --lr 0.5)")  # fmt: skip
    p.add_argument("--data", required=True, help="study folder (privmed data layouts, with a site column)")
    p.add_argument("--out", required=True, help="attack folder: attack.json, grids/, curves.png, report.md/.html")
    p.add_argument("--batch-size", default="1,4,16", help="images per site, comma-separated (1,4,16)")
    p.add_argument("--dp-sigma", default="0,0.5,1.0",
                   help="DP-SGD noise multipliers, 0 = no DP (0,0.5,1.0); privmed federate refuses 0 < sigma < 0.3")  # fmt: skip
    p.add_argument("--secagg-sites", default="1",
                   help="sites in the aggregate the server sees, 1 = a single update (1)")  # fmt: skip
    p.add_argument("--local-steps", type=int, default=1, help="local SGD steps before sending (1)")
    p.add_argument("--lr", type=float, default=0.05, help="local SGD learning rate (0.05, as privmed federate)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="DP per-sample clipping norm (1.0)")
    p.add_argument("--image-size", type=int, default=64, help="input side in pixels (64)")
    p.add_argument("--features", default="", help="small-cnn widths, e.g. 8,16,16 (default: zoo)")
    p.add_argument("--norm", default="group", choices=("group", "none", "batch"),
                   help="normalisation of the model (group, as privmed federate)")  # fmt: skip
    p.add_argument("--weights", default=None,
                   help="start from a privmed federate checkpoint RUN_DIR/rounds/round-NNNN.npz (default: seeded init)")  # fmt: skip
    p.add_argument("--known-labels", action="store_true", help="give the attacker the true labels (upper bound)")
    p.add_argument("--iterations", type=int, default=600, help="optimisation steps per restart (600)")
    p.add_argument("--restarts", type=int, default=2, help="random restarts, best objective kept (2)")
    p.add_argument("--tv", type=float, default=0.1, help="total-variation weight (0.1)")
    p.add_argument("--step-size", type=float, default=0.1, help="initial Adam step in prior std units (0.1)")
    p.add_argument("--init", default="uniform", choices=("uniform", "prior"),
                   help="start from uniform noise (Geiping et al.) or from the mean image (uniform)")  # fmt: skip
    p.add_argument("--prior-weight", type=float, default=0.0,
                   help="weight of a squared-distance pull towards the mean image (0)")  # fmt: skip
    p.add_argument("--scales", default="4,2,1", help="coarse-to-fine downsampling factors (4,2,1)")
    p.add_argument("--seed", type=int, default=0, help="seed for the model, image choice, noise, restarts (0)")
    p.add_argument("--federate-report", action="append", default=[],
                   help="a privmed federate report.json to show the AUROC cost of each defence (repeat)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.set_defaults(func=run_invert)

    p = sub.add_parser("report", help="rebuild report.md/.html and curves of an attack folder")
    p.add_argument("attack_dir", help="folder written by privmed attack invert")
    p.add_argument("--federate-report", action="append", default=[], help="privmed federate report.json (repeat)")
    p.set_defaults(func=run_report)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _progress_line(stream: Any) -> Any:
    tty = stream.isatty()

    def show(step: int, total: int, value: float) -> None:
        if tty:
            stream.write(f"\r\033[K  step {step}/{total} objective {value:.4f}")
            if step == total:
                stream.write("\r\033[K")
            stream.flush()

    return show


def run_invert(args: argparse.Namespace) -> int:
    import torch

    from privmed.attacks.experiment import AttackPlan, run_attack
    from privmed.attacks.invert import InversionConfig
    from privmed.attacks.report import write_report

    torch.set_num_threads(max(1, args.threads))
    plan = AttackPlan(
        model=args.model,
        batch_sizes=_parse_list(args.batch_size, int, "--batch-size"),
        dp_sigmas=_parse_list(args.dp_sigma, float, "--dp-sigma"),
        secagg_sites=_parse_list(args.secagg_sites, int, "--secagg-sites"),
        local_steps=args.local_steps,
        lr=args.lr,
        clip_norm=args.max_grad_norm,
        image_size=args.image_size,
        norm=args.norm,
        features=_parse_list(args.features, int, "--features") if args.features else None,
        known_labels=args.known_labels,
        weights=args.weights,
        seed=args.seed,
        inversion=InversionConfig(
            iterations=args.iterations,
            restarts=args.restarts,
            step_size=args.step_size,
            tv_weight=args.tv,
            init=args.init,
            prior_weight=args.prior_weight,
            scales=_parse_list(args.scales, int, "--scales"),
        ),
    )
    if any(b < 1 for b in plan.batch_sizes) or any(s < 1 for s in plan.secagg_sites):
        raise InputError("--batch-size and --secagg-sites: expected integers >= 1")
    if any(0 < s < 0.3 for s in plan.dp_sigmas):
        raise InputError(f"--dp-sigma: privmed federate refuses noise multipliers in (0, 0.3), got {plan.dp_sigmas}")
    n = len(plan.configurations())
    print(f"attack: {args.model}, {n} configurations (batch {plan.batch_sizes} x sigma {plan.dp_sigmas} x sites {plan.secagg_sites})", file=sys.stderr)
    started = time.perf_counter()

    def on_config(done: int, total: int, record: dict[str, Any]) -> None:
        s = record["summary"]
        eps = f" eps/round {record['epsilon_round']:.1f}" if record["epsilon_round"] is not None else ""
        print(
            f"[{done}/{total}] batch {record['batch_size']} sigma {record['dp_sigma']:g}{eps} sites {record['secagg_sites']}: "
            f"PSNR {s['psnr']:.1f} dB  SSIM {s['ssim']:.3f} (prior {s['ssim_prior']:.3f})  leakage {s['leakage']:+.3f}  "
            f"residual corr {s['residual_correlation']:.2f} (site mean {s['residual_correlation_site_mean']:.2f})  "
            f"labels {record['label_count_accuracy']:.2f}  features err {record['head_input_error']:.2g}  "
            f"{record['seconds']:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    run_attack(args.data, plan, args.out, on_config=on_config, progress=_progress_line(sys.stderr))
    paths = write_report(args.out, args.federate_report)
    print(f"done: {n} configurations in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    from privmed.attacks.report import write_report

    for kind, path in write_report(args.attack_dir, args.federate_report).items():
        print(f"{kind}: {path}")
    return 0
