"""``privmed federate simulate``: every site of a study as a Flower client on one machine.

Steps of ``simulate``:

1. check the study (``sitedata.summarize_study``: two or more sites, no empty site, the
   same label set everywhere) and open or resume RUN_DIR (``checkpoint.RunDir``);
2. run the rounds with Flower's simulation engine (``flwr.simulation.run_simulation``,
   Ray backend): the ``ServerApp`` of ``server_app`` and the ``ClientApp`` of
   ``client_app``, the same code the deployment engine runs;
3. if the run completed (or stopped at the privacy budget): train the baselines (cached in
   ``RUN_DIR/baselines.json``), export the final weights to ``RUN_DIR/model.onnx`` with the
   preprocessing sidecar, and write the report. A failed run raises PeerError with the
   reason and leaves only its completed checkpoints (re-run the same command to resume).
"""

from __future__ import annotations

import json
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from privmed.errors import PeerError
from privmed.federated.checkpoint import RunDir, atomic_write_json
from privmed.federated.config import DPConfig, FederatedConfig, SecAggConfig, safe_run_name
from privmed.federated.report import build_report, write_report
from privmed.federated.sitedata import summarize_study

log = logging.getLogger(__name__)

__all__ = ["SimulationResult", "export_final_model", "prepare_config", "simulate"]


@dataclass(frozen=True)
class SimulationResult:
    run_dir: Path
    state: str
    message: str
    report: dict[str, Any] | None
    paths: dict[str, Path]


def prepare_config(
    study_dir: str | Path,
    out: str | Path,
    *,
    model: str,
    rounds: int,
    secagg: bool = True,
    dp: DPConfig | None = None,
    image_size: int = 64,
    features: tuple[int, ...] = (),
    norm: str = "group",
    recipe: str = "end-to-end",
    train_params: str = "all",
    ema: float = 0.0,
    augment_mult: int = 1,
    local_epochs: int = 1,
    batch_size: int = 16,
    lr: float = 0.05,
    seed: int = 0,
    test_fraction: float = 0.2,
    secagg_clip: float = 8.0,
    secagg_threshold: float = 0.67,
    secagg_timeout: float = 300.0,
) -> FederatedConfig:
    """The run's configuration from a study and CLI-level settings (checked).

    Labels and sites come from the study. The SecAgg+ max weight is the largest training
    set, which gives the finest quantisation. A resumed RUN_DIR keeps its run name (the
    key of every site's privacy ledger).
    """
    summary = summarize_study(study_dir, test_fraction)
    run_dir = RunDir(out)
    if run_dir.manifest_path.exists():
        run_name = run_dir.stored_config().run_name
    else:
        run_name = safe_run_name(Path(out).resolve().name, secrets.token_hex(4))
    sa = None
    if secagg:
        sa = SecAggConfig(
            reconstruction_threshold=secagg_threshold,
            clipping_range=secagg_clip,
            max_weight=float(max(summary.train_counts.values())),
            timeout=secagg_timeout,
        )
    config = FederatedConfig(
        model=model, rounds=rounds, labels=summary.labels, sites=summary.sites,
        image_size=image_size, features=tuple(features), local_epochs=local_epochs, batch_size=batch_size, lr=lr,
        norm=norm, recipe=recipe, train_params=train_params, ema=ema, augment_mult=augment_mult, test_fraction=test_fraction, seed=seed,
        run_name=run_name,
        secagg=sa, dp=dp,
    )  # fmt: skip
    config.check()
    return config


def export_final_model(run_dir: RunDir, config: FederatedConfig) -> Path:
    """Final weights -> RUN_DIR/model.onnx (sigmoid outputs) + model.preprocess.json."""
    from torch import nn

    from privmed.federated.arrays import set_arrays
    from privmed.federated.baselines import initial_model
    from privmed.federated.recipes import feature_extractor
    from privmed.federated.sitedata import preprocess_for
    from privmed.models.export import export_onnx
    from privmed.models.scatter import fold_weight_standardization

    last = run_dir.last_round()
    weights = run_dir.ema_weights(config.ema, last) if config.ema else run_dir.load_round(last)[1]
    model = initial_model(config)
    set_arrays(model, weights)
    fold_weight_standardization(model)  # one Conv in the ONNX graph (same function)
    extractor = feature_extractor(config.recipe)
    served = nn.Sequential(*([extractor] if extractor is not None else []), model, nn.Sigmoid()).eval()
    return export_onnx(
        served, (1, 1, config.image_size, config.image_size), run_dir.root / "model.onnx",
        preprocess_for(config.image_size),
        metadata={"privmed.task": "multilabel-classification", "privmed.output": "probabilities",
                  "privmed.labels": json.dumps(list(config.labels)),
                  "privmed.federated.run": config.run_name,
                  "privmed.federated.recipe": config.recipe},
    )  # fmt: skip


def _baselines(study_dir: str | Path, run_dir: RunDir, config: FederatedConfig) -> dict[str, Any]:
    """Central and local-only baselines, cached per configuration in RUN_DIR/baselines.json."""
    from privmed.federated.baselines import central_baseline, local_only_baseline
    from privmed.federated.recipes import site_inputs
    from privmed.federated.sitedata import load_site

    key = {k: v for k, v in config.to_flat().items() if not k.startswith(("secagg", "dp", "run-name"))}
    cache = run_dir.root / "baselines.json"
    if cache.exists():
        body = json.loads(cache.read_text(encoding="utf-8"))
        if body.get("key") == key:
            return dict(body["baselines"])
    sites = [
        site_inputs(config.recipe, load_site(study_dir, s, labels=config.labels, image_size=config.image_size,
                                             test_fraction=config.test_fraction), run_dir.site_state_dir(s),
                    config.augment_mult)
        for s in config.sites
    ]  # fmt: skip
    result = {"central": central_baseline(config, sites), "local_only": local_only_baseline(config, sites)}
    result = json.loads(json.dumps(result).replace("NaN", "null"))
    atomic_write_json(cache, {"key": key, "baselines": result})
    return result


def simulate(
    study_dir: str | Path,
    config: FederatedConfig,
    out: str | Path,
    *,
    baselines: bool = True,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    cpus: int = 2,
    verbose: bool = False,
    connect_timeout: float = 600.0,
    client_app: Any = None,
) -> SimulationResult:
    """Run (or resume) the simulation in ``out``; see the module docstring.

    ``client_app`` replaces the default site ClientApp (tests inject a dropping site).
    """
    from flwr.simulation import run_simulation

    from privmed.federated.client_app import SimulationSites, make_client_app
    from privmed.federated.ledger import SiteBudget
    from privmed.federated.server_app import make_server_app

    config.check()
    run_dir = RunDir(out)
    config = run_dir.open(config)
    if client_app is None:
        client_app = make_client_app(
            SimulationSites(
                data_dir=Path(study_dir).resolve(), sites=config.sites, run_dir=run_dir.root.resolve(),
                require_secagg=config.secagg is not None, require_dp=config.dp is not None,
                max_epsilon=config.dp.epsilon if config.dp else math.inf,
                # one user owns every simulated site and its ledgers live in RUN_DIR: the
                # site total is the run's budget
                total=SiteBudget(config.dp.epsilon, config.dp.delta) if config.dp else SiteBudget(),
            )
        )  # fmt: skip
    server_app = make_server_app(run_dir.root.resolve(), config, on_round, connect_timeout)
    backend = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, cpus), "log_to_driver": verbose,
                      "logging_level": "info" if verbose else "error"},
    }
    flwr_logger = logging.getLogger("flwr")
    saved_level = flwr_logger.level
    if not verbose:
        flwr_logger.setLevel(logging.WARNING)
    try:
        run_simulation(server_app, client_app, num_supernodes=len(config.sites),
                       backend_config=backend, verbose_logging=verbose)  # type: ignore[arg-type]
    finally:
        flwr_logger.setLevel(saved_level)
    status = run_dir.status()
    state, message = str(status.get("state")), str(status.get("message", ""))
    if state not in ("complete", "stopped-budget"):
        raise PeerError(
            f"federated run in {run_dir.root} {state}: {message or 'no status written'}"
            f" (completed rounds: {max(run_dir.last_round(), 0)}; re-run to resume)"
        )
    base = _baselines(study_dir, run_dir, config) if baselines else None
    onnx_path = export_final_model(run_dir, config)
    report = build_report(run_dir, replace(config, rounds=config.rounds), baselines=base, onnx_path=onnx_path)
    paths = write_report(run_dir, report)
    paths["onnx"] = onnx_path
    return SimulationResult(run_dir.root, state, message, report, paths)
