"""Benchmark (not a test): gradient inversion on the synthetic chest phantoms, per defence.

The study is the one ``benchmarks/federated_bench.py`` trains on (3 sites x 160 chest
phantoms, 64x64, seed 0), the model is the federated benchmark's small-cnn (GroupNorm,
17 k parameters, SGD lr 0.05) at its seeded initialisation, i.e. the first round. From the
undefended base case (batch 1, no DP, one site's update) one factor varies at a time:
batch size 4 and 16, DP noise multiplier 0.5 and 1.0, and 3 sites summed by secure
aggregation (at batch 1 and 4). The same small-cnn without normalisation (``--norm none``,
the variant ``privmed federate`` trains for secure inference) is attacked in four of these
configurations. Pass the federated benchmark's run reports with ``--federate-report`` to
put the AUROC cost of DP beside the leakage (they are GroupNorm runs).

    python benchmarks/attack_bench.py --out /tmp/attack_bench \\
        --federate-report RUN/fed-secagg/report.json --federate-report RUN/fed-secagg-dp/report.json

Writes OUT/attack-<norm>/{attack.json, report.md, report.html, curves.png, grids/} and
OUT/bench.md; ``--figures DIR`` also copies the GroupNorm curves and grids to
DIR/attack_*.png.
About 10 minutes on one thread of the shared 2-core machine.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

from privmed.attacks.experiment import AttackPlan, run_attack
from privmed.attacks.invert import InversionConfig
from privmed.attacks.report import config_table, write_report

BASE = (1, 0.0, 1)
CONFIGURATIONS = {
    "group": [BASE, (4, 0.0, 1), (16, 0.0, 1), (1, 0.5, 1), (1, 1.0, 1), (1, 0.0, 3), (4, 0.0, 3)],
    "none": [BASE, (4, 0.0, 1), (1, 1.0, 1), (1, 0.0, 3)],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/attack_bench")
    parser.add_argument("--per-site", type=int, default=160)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--restarts", type=int, default=2)
    parser.add_argument("--init", choices=("uniform", "prior"), default="uniform",
                        help="uniform noise (Geiping et al.) or the mean image (an attacker who knows the anatomy)")
    parser.add_argument("--prior-weight", type=float, default=0.0)
    parser.add_argument("--norms", default="group,none", help="which small-cnn variants to attack")
    parser.add_argument("--federate-report", action="append", default=[])
    parser.add_argument("--figures", default=None, help="copy curves + base grid here as attack_*.png")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from privmed.data.synth import synth_chest_study

    out = Path(args.out)
    study = out / "study"
    if not (study / "labels.csv").exists():
        synth_chest_study(study, sites=3, n_per_site=args.per_site, size=args.size, seed=0)
    started = time.perf_counter()

    def on_config(done: int, total: int, record: dict) -> None:
        s = record["summary"]
        print(f"[{done}/{total}] {record['id']}: PSNR {s['psnr']:.1f} SSIM {s['ssim']:.3f} "
              f"(prior {s['ssim_prior']:.3f}) leakage {s['leakage']:+.3f} "
              f"residual corr {s['residual_correlation']:.3f} (site mean {s['residual_correlation_site_mean']:.3f}) "
              f"features err {record['head_input_error']:.2g} {record['seconds']:.0f} s",
              file=sys.stderr, flush=True)

    lines = []
    for norm in args.norms.split(","):
        configurations = CONFIGURATIONS[norm]
        plan = AttackPlan(
            model="small-cnn",
            image_size=args.size,
            lr=0.05,
            norm=norm,
            inversion=InversionConfig(
                iterations=args.iterations, restarts=args.restarts, tv_weight=0.1,
                init=args.init, prior_weight=args.prior_weight,
            ),
        )
        attack_dir = out / f"attack-{norm}"
        part = time.perf_counter()
        body = run_attack(study, plan, attack_dir, on_config=on_config, configurations=configurations)
        paths = write_report(attack_dir, args.federate_report if norm == "group" else [])
        rows = config_table(body["configurations"])
        lines += [
            f"**small-cnn, norm {norm}** ({time.perf_counter() - part:.0f} s)",
            "",
            "| " + " | ".join(rows[0]) + " |",
            "|" + "---|" * len(rows[0]),
            *("| " + " | ".join(r) + " |" for r in rows[1:]),
            "",
        ]
        if args.figures and norm == "group":
            figures = Path(args.figures)
            figures.mkdir(parents=True, exist_ok=True)
            shutil.copy(paths["curves"], figures / "attack_curves.png")
            for record in body["configurations"]:
                shutil.copy(attack_dir / record["grid"], figures / Path(record["grid"]).name)
    header = (
        f"small-cnn at initialisation, {args.size}x{args.size} synthetic chest phantoms "
        f"(3 sites x {args.per_site}), 1 local SGD step (lr 0.05), clipping norm 1, labels recovered "
        f"from the update; inversion {args.iterations} iterations x {args.restarts} restarts, TV 0.1, "
        f"init {args.init}, prior weight {args.prior_weight:g}, "
        f"scales 4,2,1; torch threads 1; total {time.perf_counter() - started:.0f} s"
    )
    (out / "bench.md").write_text(header + "\n\n" + "\n".join(lines))
    print(header + "\n\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
