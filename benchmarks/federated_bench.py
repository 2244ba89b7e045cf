"""Federated benchmark (not a test): what SecAgg+ and DP cost in AUROC against central and
local-only training, on a synthetic multi-site chest study.

Runs, all on the same study, split and initial weights:

1. federated + SecAgg+ (Flower simulation engine), with the two baselines
   (centrally pooled, local-only per site) trained by the same local trainer;
2. federated + SecAgg+ + DP-SGD at every site (Opacus) at ``--epsilon``.

Re-running with the same arguments resumes interrupted runs (the study is regenerated
byte-identically, completed runs and baselines are reused). Prints one table (pooled AUROC = all sites' held-out images, macro over the 4 findings;
per-site AUROC on each site's own held-out images) and writes ``bench.json`` and
``bench.md`` to ``--out``.

    python benchmarks/federated_bench.py                       # ResNet-18, 3 x 160 images, 32x32
    python benchmarks/federated_bench.py --model densenet121 --size 32 --per-site 120
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", choices=("resnet18", "densenet121", "small-cnn"))
    ap.add_argument("--size", type=int, default=32, help="image side (32)")
    ap.add_argument("--sites", type=int, default=3)
    ap.add_argument("--per-site", type=int, default=160, help="images per site (160)")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--epsilon", type=float, default=8.0)
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--max-grad-norm", type=float, default=1.0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--out", default="/tmp/privmed-federated-bench")
    ap.add_argument("--fresh", action="store_true",
                    help="delete --out first (default: resume the runs found there)")  # fmt: skip
    args = ap.parse_args()

    import torch

    from privmed.data.synth import synth_chest_study
    from privmed.federated.config import DPConfig
    from privmed.federated.report import round_line
    from privmed.federated.simulate import prepare_config, simulate

    torch.set_num_threads(1)
    out = Path(args.out)
    if args.fresh:
        shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    study = synth_chest_study(out / "study", sites=args.sites, n_per_site=args.per_site, size=args.size, seed=0)
    print(f"study: {args.sites} sites x {args.per_site} images, {args.size}x{args.size} ({time.perf_counter() - t0:.0f} s)")

    def run(name: str, dp: DPConfig | None, baselines: bool) -> tuple[dict[str, Any], float]:
        """The run's report and its time in rounds (sum over completed rounds, also when resumed)."""
        cfg = prepare_config(study, out / name, model=args.model, rounds=args.rounds, secagg=True, dp=dp,
                             image_size=args.size, batch_size=args.batch_size, lr=args.lr)  # fmt: skip
        result = simulate(study, cfg, out / name, baselines=baselines, cpus=args.cpus,
                          on_round=lambda m: print(f"  [{name}] {round_line(m)}", flush=True))  # fmt: skip
        report = result.report or {}
        return report, sum(r.get("seconds") or 0.0 for r in report.get("rounds", []))

    print(f"federated + SecAgg+ ({args.model}, {args.rounds} rounds) with baselines ...", flush=True)
    plain, t_plain = run("fed-secagg", None, baselines=True)
    dp = DPConfig(args.epsilon, args.delta, args.max_grad_norm)
    print(f"federated + SecAgg+ + DP (epsilon={args.epsilon:g}, delta={args.delta:g}) ...", flush=True)
    private, t_dp = run("fed-secagg-dp", dp, baselines=False)

    sites = sorted(plain["final"]["sites"])
    rows = [
        ("central (pooled data)", plain["baselines"]["central"]["pooled_auroc_macro"],
         plain["baselines"]["central"]["sites"], ""),
        ("local-only (each site alone)", plain["baselines"]["local_only"]["pooled_auroc_macro"],
         plain["baselines"]["local_only"]["sites"], ""),
        ("federated + SecAgg+", plain["final"]["pooled_auroc_macro"], plain["final"]["sites"], f"{t_plain:.0f} s"),
        (f"federated + SecAgg+ + DP (eps {args.epsilon:g})", private["final"]["pooled_auroc_macro"],
         private["final"]["sites"], f"{t_dp:.0f} s"),
    ]  # fmt: skip
    lines = [
        f"| method | pooled AUROC | {' | '.join(sites)} | time in rounds |",
        "|---|---|" + "---|" * len(sites) + "---|",
    ]
    for name, pooled, per_site, wall in rows:
        lines.append(f"| {name} | {_fmt(pooled)} | " + " | ".join(_fmt(per_site.get(s)) for s in sites) + f" | {wall} |")
    status = private.get("status", {})
    if status.get("state") != "complete":
        lines.append(f"\nDP run: {status.get('state')} after {len(private.get('rounds', []))} rounds: {status.get('message')}")
    privacy = [
        f"{s}: epsilon={p['epsilon']:.2f} delta={p['delta']:g} noise_multiplier={p['noise_multiplier']:.3f} "
        f"clipping_norm={p['max_grad_norm']:g} sample_rate={p['sample_rate']:.4f} steps={p['steps']}"
        for s, p in sorted((private.get("privacy") or {}).items())
    ]
    setup = (f"{args.model} (GroupNorm), {args.sites} sites x {args.per_site} synthetic chest images at "
             f"{args.size}x{args.size} (80/20 train/test by image-id hash), {args.rounds} rounds x 1 local "
             f"epoch, SGD lr {args.lr} batch {args.batch_size}, {os.cpu_count()} CPUs shared, "
             f"torch threads 1, Ray CPUs {args.cpus}")  # fmt: skip
    text = "\n".join([setup, "", *lines, "", "DP spent per site: " + "; ".join(privacy)])
    print("\n" + text)
    (out / "bench.md").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps({"setup": setup, "federated_secagg": plain,
                                                "federated_secagg_dp": private}, indent=2, default=str))  # fmt: skip


if __name__ == "__main__":
    main()
