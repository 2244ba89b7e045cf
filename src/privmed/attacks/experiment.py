"""One attack per configuration (batch size x DP noise x aggregated sites), scored and drawn.

For each configuration ``attack_configuration``:

1. picks ``batch_size`` training images from each of ``sites`` sites (``targets``);
2. computes what each site sends (``updates.site_update`` = ``privmed federate``'s own
   ``client_update``, DP-SGD when ``dp_sigma > 0``) and, for several sites, the FedAvg
   aggregate that secure aggregation reveals;
3. recovers label counts from the head-bias update (``labels``), unless the plan gives the
   attacker the true labels, and reads the head's input (the image's penultimate features)
   analytically off the head update, scored as ``head_input_error``;
4. inverts the update (``invert``), matches reconstructions to images and scores them
   (``metrics``), and writes the ground truth | reconstruction grid (``grid``).

``run_attack`` runs the grid and rewrites ``ATTACK_DIR/attack.json`` after every
configuration, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privmed.attacks.grid import write_pair_grid
from privmed.attacks.invert import InversionConfig, invert_update
from privmed.attacks.labels import (
    assign_labels,
    head_input,
    label_count_accuracy,
    recover_head_input,
    recover_label_counts,
)
from privmed.attacks.metrics import nan_mean, residual_correlation, score_batch
from privmed.attacks.targets import StudyImages, display, load_study_images, pick_batches
from privmed.attacks.updates import SiteProtocol, aggregate_updates, site_update
from privmed.errors import InputError

log = logging.getLogger(__name__)

FORMAT = "privmed-attack-report"
SCATTER = "scatter"  # the scatter recipe (federated/recipes.py) as a target
DELTA = 1e-5  # delta of the per-round epsilon shown beside each DP configuration


@dataclass(frozen=True)
class AttackPlan:
    """Everything ``privmed attack invert`` varies or fixes (all of it goes into the report)."""

    model: str
    batch_sizes: tuple[int, ...] = (1, 4, 16)
    dp_sigmas: tuple[float, ...] = (0.0, 0.5, 1.0)
    secagg_sites: tuple[int, ...] = (1,)
    local_steps: int = 1
    lr: float = 0.05
    clip_norm: float = 1.0
    image_size: int = 64
    norm: str = "group"
    features: tuple[int, ...] | None = None
    known_labels: bool = False
    weights: str | None = None
    seed: int = 0
    inversion: InversionConfig = field(default_factory=InversionConfig)

    def configurations(self) -> list[tuple[int, float, int]]:
        """``(batch_size, dp_sigma, sites)`` for every combination, in run order."""
        return list(itertools.product(self.batch_sizes, self.dp_sigmas, self.secagg_sites))


def config_id(batch_size: int, dp_sigma: float, sites: int) -> str:
    return f"b{batch_size}-sigma{dp_sigma:g}-sites{sites}"


def build_global_model(plan: AttackPlan, num_outputs: int) -> nn.Module:
    """The global model the sites start the round from: seeded initialisation or a checkpoint.

    ``plan.weights`` may name a ``privmed federate`` round checkpoint
    (``RUN_DIR/rounds/round-NNNN.npz``: ``names`` plus one array per federated parameter).
    """
    from privmed.models.zoo import build_model

    if plan.model == SCATTER:
        return scatter_target(plan, num_outputs)
    torch.manual_seed(plan.seed)
    model = build_model(plan.model, 1, num_outputs, norm=plan.norm, features=plan.features)
    if plan.weights is not None:
        _load_checkpoint(model, plan)
    return model


def scatter_target(plan: AttackPlan, num_outputs: int) -> nn.Module:
    """The scatter recipe's model as one network on images: frozen scattering, then the head.

    Both parts come from the recipe's own builders (``recipes.feature_extractor`` and
    ``baselines.initial_model``, i.e. ``FederatedConfig.build_model`` seeded as round 0 of a
    run), so the head is the one ``privmed federate --recipe scatter`` trains. The
    attacker knows the public transform; its filters are buffers, so the update
    (``trainable_names``) is the head's parameters only, in the head's order. A site
    computes the features once and trains the head on them; running the transform inside
    the forward pass gives the same update and lets the inversion differentiate through it.
    ``plan.weights`` (a scatter run's round checkpoint) is loaded into the head;
    ``plan.norm`` and ``plan.features`` do not apply.
    """
    from privmed.federated.baselines import initial_model
    from privmed.federated.config import FederatedConfig
    from privmed.federated.recipes import feature_extractor

    config = FederatedConfig(
        model="small-cnn", rounds=1, labels=tuple(f"finding_{k}" for k in range(num_outputs)),
        sites=("attacked", "other"), image_size=plan.image_size, recipe=SCATTER, seed=plan.seed, secagg=None,
    )  # fmt: skip
    config.check()  # the recipe's image-size rule (a multiple of 8)
    head = initial_model(config)
    if plan.weights is not None:
        _load_checkpoint(head, plan)
    return nn.Sequential(feature_extractor(SCATTER), head)


def _load_checkpoint(model: nn.Module, plan: AttackPlan) -> None:
    """Set ``model``'s federated parameters from the round checkpoint ``plan.weights``."""
    if plan.weights is not None:
        from privmed.federated.arrays import federated_names, set_arrays

        path = Path(plan.weights)
        try:
            with np.load(path, allow_pickle=False) as data:
                names = [str(n) for n in data["names"]]
                arrays = [data[f"{i:04d}"] for i in range(len(names))]
        except (OSError, KeyError, ValueError) as exc:
            raise InputError(f"{path}: expected a privmed federate round checkpoint (.npz): {exc}") from None
        if names != federated_names(model):
            raise InputError(f"{path}: parameters do not match {plan.model} (norm {plan.norm}, features {plan.features})")
        set_arrays(model, arrays)


def round_epsilon(dp_sigma: float, steps: int, delta: float = DELTA) -> float | None:
    """Epsilon of one round (``steps`` full-batch DP-SGD steps, sample rate 1), Opacus RDP."""
    if dp_sigma <= 0:
        return None
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(dp_sigma, 1.0, steps)]
    return float(accountant.get_epsilon(delta))


def _seed(plan: AttackPlan, *parts: int) -> int:
    return int(np.random.default_rng([plan.seed, *parts]).integers(2**62))


def attack_configuration(
    model: nn.Module,
    study: StudyImages,
    plan: AttackPlan,
    batch_size: int,
    dp_sigma: float,
    sites: int,
    out_dir: Path,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict[str, Any]:
    """Run steps 1-4 of the module docstring for one configuration; return its record."""
    started = time.perf_counter()
    protocol = SiteProtocol(plan.local_steps, plan.lr, dp_sigma, plan.clip_norm)
    sigma_key = int(round(dp_sigma * 1000))
    xs, ys = pick_batches(study, batch_size, sites, plan.seed)
    updates = [
        site_update(model, x, y, protocol, noise_seed=_seed(plan, batch_size, sites, sigma_key, i))
        for i, (x, y) in enumerate(zip(xs, ys, strict=True))
    ]
    observed = updates[0] if sites == 1 else aggregate_updates(updates, [batch_size] * sites)
    truth_x, truth_y = np.concatenate(xs), np.concatenate(ys)
    n_images = truth_x.shape[0]
    prior_t = torch.from_numpy(study.prior.image)
    estimate = recover_label_counts(model, observed, protocol, n_images, len(study.labels), prior_t)
    features = head_input(model, torch.from_numpy(truth_x), len(study.labels))
    recovered = recover_head_input(model, observed, len(study.labels))
    feature_error = ((features - recovered).norm(dim=1) / features.norm(dim=1).clamp_min(1e-12)).min()
    draw: Callable[[np.random.Generator], np.ndarray]
    if plan.known_labels:
        draw = lambda rng: truth_y.astype(np.float32)  # noqa: E731
    else:
        draw = lambda rng: assign_labels(estimate, rng)  # noqa: E731
    inversion = invert_update(
        model, observed, protocol, [batch_size] * sites, study.prior, draw, plan.inversion,
        torch.Generator().manual_seed(_seed(plan, batch_size, sites, sigma_key, 1000)),
        np.random.default_rng(_seed(plan, batch_size, sites, sigma_key, 2000)),
        progress,
    )
    truth01, rec01 = display(truth_x, study.prior), display(inversion.images, study.prior)
    order, scores = score_batch(rec01, truth01, display(study.prior.image, study.prior))
    cid = config_id(batch_size, dp_sigma, sites)
    grid = write_pair_grid(out_dir / "grids" / f"attack_{cid}.png", truth01, rec01[order])
    site_of = [site for site in study.sites[:sites] for _ in range(batch_size)]
    site_baseline = _site_mean_correlation(study, site_of, truth01)
    return {
        "id": cid,
        "batch_size": batch_size,
        "dp_sigma": dp_sigma,
        "secagg_sites": sites,
        "n_images": n_images,
        "epsilon_round": round_epsilon(dp_sigma, plan.local_steps),
        "labels": "known" if plan.known_labels else "recovered",
        "label_count_accuracy": label_count_accuracy(estimate, truth_y),
        # relative L2 error of the head input read analytically off the update, against the
        # closest attacked image's (labels.recover_head_input): ~0 means recovered exactly
        "head_input_error": float(feature_error),
        "objective": inversion.objective,
        "restart_objectives": inversion.restart_objectives,
        "summary": {**scores.summary(), "residual_correlation_site_mean": nan_mean(site_baseline)},
        "images": [
            {
                "site": site_of[j],
                "mse": float(scores.mse[j]),
                "psnr": float(scores.psnr[j]),
                "ssim": float(scores.ssim[j]),
                "ssim_prior": float(scores.ssim_prior[j]),
                "leakage": float(scores.leakage[j]),
                "residual_correlation": float(scores.residual_correlation[j]),
                "residual_correlation_site_mean": float(site_baseline[j]),
            }
            for j in range(n_images)
        ],
        "grid": str(grid.relative_to(out_dir)),
        "seconds": time.perf_counter() - started,
    }


def _site_mean_correlation(study: StudyImages, site_of: Sequence[str], truth01: np.ndarray) -> np.ndarray:
    """Residual correlation a *guess* gets: the image's own site's held-out mean image.

    A server that knows which site sent an update, and what that site's scanner makes
    images look like, gets this much of the patient's "difference from the mean" for free;
    a reconstruction leaks patient-specific detail only beyond it. NaN without a site mean.
    """
    prior01 = display(study.prior.image, study.prior)
    out = np.full(len(site_of), np.nan)
    for j, site in enumerate(site_of):
        if site in study.site_priors:
            guess = display(study.site_priors[site], study.prior)[None]
            out[j] = residual_correlation(guess, truth01[j : j + 1], prior01)[0]
    return out


def plan_dict(plan: AttackPlan) -> dict[str, Any]:
    """JSON-ready form of the plan."""
    body = asdict(plan)
    body["inversion"] = asdict(plan.inversion)
    return body


def run_attack(
    study_root: str | Path,
    plan: AttackPlan,
    out_dir: str | Path,
    on_config: Callable[[int, int, dict[str, Any]], None] | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    configurations: Sequence[tuple[int, float, int]] | None = None,
) -> dict[str, Any]:
    """Attack every configuration of ``plan`` on the study at ``study_root``.

    ``configurations`` (``(batch_size, dp_sigma, sites)`` triples) replaces the full grid
    ``plan.configurations()``, e.g. to vary one factor at a time.

    Writes ``out_dir/attack.json`` (rewritten after each configuration) and
    ``out_dir/grids/attack_<id>.png``; returns the JSON body. ``on_config(done, total,
    record)`` is called after each configuration.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = load_study_images(study_root, plan.image_size)
    model = build_global_model(plan, len(study.labels))
    body: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "study": {"root": str(study_root), "labels": list(study.labels), "sites": list(study.sites)},
        "plan": plan_dict(plan),
        "prior": {"n_images": study.n_prior, "low": study.prior.low, "high": study.prior.high},
        "configurations": [],
        "complete": False,
    }
    configurations = list(configurations) if configurations is not None else plan.configurations()
    started = time.perf_counter()
    for done, (batch_size, dp_sigma, sites) in enumerate(configurations, start=1):
        log.info("attack %s", config_id(batch_size, dp_sigma, sites))
        record = attack_configuration(model, study, plan, batch_size, dp_sigma, sites, out, progress)
        body["configurations"].append(record)
        _write_json(out / "attack.json", body)
        if on_config is not None:
            on_config(done, len(configurations), record)
    body["complete"] = True
    body["seconds"] = time.perf_counter() - started
    _write_json(out / "attack.json", body)
    return body


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by None (strict JSON)."""
    if isinstance(value, float):
        return value if np.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _write_json(path: Path, body: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(json_safe(body), indent=1, allow_nan=False))
    tmp.replace(path)
