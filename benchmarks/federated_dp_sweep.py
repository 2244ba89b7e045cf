"""Privacy-utility sweep (not a test): pooled AUROC against epsilon for two DP recipes.

For each images-per-site study (synthetic chest phantoms, 3 sites, seed 0), recipe, epsilon
and seed, one federated run with **SecAgg+ on** and DP-SGD at every site, through the code
sites run (``ServerApp`` with ``SecAggPlusWorkflow``, ``secaggplus_mod``, ``SiteClient``,
the site ledgers), with the in-process transport of ``privmed.federated.inprocess``
instead of Ray (same messages, sites one after another; Ray's start-up would dominate).

Recipes:

- ``end-to-end`` (privmed's first recipe, what the README measured): small-cnn (GroupNorm,
  widths 8,16,16), every parameter under DP-SGD, batch 16, lr 0.05, 10 rounds.
- ``scatter`` (the new default of ``privmed federate --dp-epsilon``): frozen scattering
  features + DP-trained head, lr 0.5, batch and rounds chosen by the accountant for the
  epsilon (``recipes.plan_dp``).

``inf`` = the same recipe without DP (no clipping, no noise), with the schedule the recipe
uses at epsilon 8. Delta 1e-5, clipping norm 1. The seed sets the initial weights and the
plain-SGD data order; DP noise and sampling come from fresh PRG keys in every run.

Results: one JSON line per measured point in ``--out/points.jsonl`` (appended as each run
finishes; re-running skips measured points). ``benchmarks/federated_dp_figure.py`` makes
the table and the figure from it.

    python benchmarks/federated_dp_sweep.py --per-site 160
    python benchmarks/federated_dp_sweep.py --per-site 2000
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

DELTA = 1e-5
E2E = {"batch_size": 16, "rounds": 10, "lr": 0.05}
SCATTER_LR = 0.5


def _schedule(recipe: str, epsilon: float, smallest: int) -> dict[str, Any]:
    from privmed.federated.recipes import plan_dp

    if recipe == "end-to-end":
        return dict(E2E)
    plan = plan_dp(8.0 if math.isinf(epsilon) else epsilon, DELTA, smallest)
    return {"batch_size": plan.batch_size, "rounds": plan.rounds, "lr": SCATTER_LR, "plan": plan.reason}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-site", type=int, required=True, help="images per site (160, 2000)")
    ap.add_argument("--size", type=int, default=32, help="image side (32)")
    ap.add_argument("--epsilons", default="8,inf,1,2,4,16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--recipes", default="scatter,end-to-end")
    ap.add_argument("--ema", type=float, default=0.0,
                    help="moving average of the global weights (points recorded as RECIPE+emaD)")  # fmt: skip
    ap.add_argument("--augment-mult", type=int, default=1,
                    help="augmented views per training image (points recorded as RECIPE+augK)")  # fmt: skip
    ap.add_argument("--out", default="benchmarks/results/federated_dp")
    ap.add_argument("--work", default="/tmp/privmed-dp-sweep", help="run folders and studies (deleted per run)")
    args = ap.parse_args()

    import torch

    from privmed.data.synth import synth_chest_study
    from privmed.federated.checkpoint import RunDir
    from privmed.federated.client_app import SimulationSites, make_client_app
    from privmed.federated.config import DPConfig
    from privmed.federated.inprocess import run_in_process
    from privmed.federated.ledger import SiteBudget
    from privmed.federated.server_app import make_server_app
    from privmed.federated.simulate import prepare_config
    from privmed.federated.sitedata import load_site, summarize_study

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    out, work = Path(args.out), Path(args.work) / f"n{args.per_site}"
    out.mkdir(parents=True, exist_ok=True)
    points = out / "points.jsonl"

    def done() -> set[tuple[Any, ...]]:
        """Points already measured (re-read before every run: several sweeps may share the file)."""
        if not points.exists():
            return set()
        rows = (json.loads(line) for line in points.read_text().splitlines() if line.strip())
        return {(p["per_site"], p["recipe"], p["epsilon"], p["seed"]) for p in rows}

    study = work / "study"
    if not (study / "labels.csv").exists():
        synth_chest_study(study, sites=3, n_per_site=args.per_site, size=args.size, seed=0)
    smallest = min(summarize_study(study).train_counts.values())
    loaded: dict[tuple[Any, ...], Any] = {}

    def loader(root: Any, site: str, **kw: Any) -> Any:
        key = (str(root), site, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in loaded:
            loaded[key] = load_site(root, site, **kw)
        return loaded[key]

    # epsilon-major: the target points (8, inf) of every recipe first, then the curve
    for eps_text in args.epsilons.split(","):
        epsilon = float(eps_text)
        for recipe in args.recipes.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                eps_key = "inf" if math.isinf(epsilon) else epsilon
                label = recipe + (f"+ema{args.ema:g}" if args.ema else "")
                label += f"+aug{args.augment_mult}" if args.augment_mult > 1 else ""
                if (args.per_site, label, eps_key, seed) in done():
                    continue
                sched = _schedule(recipe, epsilon, smallest)
                dp = None if math.isinf(epsilon) else DPConfig(epsilon, DELTA, 1.0)
                run = work / f"{label}-eps{eps_text}-seed{seed}"
                shutil.rmtree(run, ignore_errors=True)
                cfg = prepare_config(
                    study, run, model="small-cnn", rounds=sched["rounds"], secagg=True, dp=dp,
                    image_size=args.size, features=(8, 16, 16), recipe=recipe,
                    batch_size=sched["batch_size"], lr=sched["lr"], seed=seed, ema=args.ema,
                    augment_mult=args.augment_mult,
                )  # fmt: skip
                sites = SimulationSites(
                    data_dir=study.resolve(), sites=cfg.sites, run_dir=run.resolve(), require_secagg=True,
                    require_dp=dp is not None, max_epsilon=epsilon if dp else math.inf,
                    total=SiteBudget(epsilon, DELTA) if dp else SiteBudget(),
                )  # fmt: skip
                features = work / "features"

                def resolver(context: Any, sites: Any = sites, features: Path = features) -> Any:
                    spec = sites(context)
                    return replace(spec, feature_cache=features / spec.site, loader=loader)

                started = time.perf_counter()
                run_in_process(make_server_app(run.resolve(), cfg, connect_timeout=60),
                               make_client_app(resolver), len(cfg.sites))  # fmt: skip
                wall = time.perf_counter() - started
                rd = RunDir(run)
                status = rd.status()
                last = rd.last_round()
                metrics = rd.load_round(last)[2] if last > 0 else {}
                fit = metrics.get("fit", {})
                point = {
                    "per_site": args.per_site, "recipe": label, "epsilon": eps_key, "seed": seed, "ema": args.ema,
                    "augment_mult": args.augment_mult,
                    "pooled_auroc": metrics.get("pooled_auroc_macro"),
                    "sites": {s: metrics.get("evaluation", {}).get(s, {}).get("auroc_macro") for s in cfg.sites},
                    "per_label": metrics.get("pooled_auroc"),
                    "status": status.get("state"), "rounds_done": last, "wall_s": round(wall, 1),
                    "batch_size": cfg.batch_size, "rounds": cfg.rounds, "lr": cfg.lr,
                    "n_train": {s: fit.get(s, {}).get("n-train") for s in cfg.sites},
                    "dp": {s: {k: fit.get(s, {}).get(f"dp-{k}") for k in
                               ("epsilon", "noise-multiplier", "sample-rate", "steps")} for s in cfg.sites}
                    if dp else None,
                    "plan": sched.get("plan"), "secagg": cfg.secagg is not None,
                    "date": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "cpus": os.cpu_count(),
                }  # fmt: skip
                with points.open("a") as fh:
                    fh.write(json.dumps(point) + "\n")
                print(f"n={args.per_site} {label} eps={eps_text} seed={seed}: pooled AUROC"
                      f" {point['pooled_auroc']} ({status.get('state')}, {last} rounds, {wall:.0f} s)", flush=True)  # fmt: skip
                shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
