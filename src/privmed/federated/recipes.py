"""DP training recipes: what a site trains, on which inputs, and the DP schedule for a budget.

Recipes (``FederatedConfig.recipe``, recorded in the manifest and the report):

- ``end-to-end``: the zoo network (``FederatedConfig.model``) trained from its seeded
  initial weights, every parameter under DP-SGD (privmed's first recipe).
- ``scatter``: a frozen order-2 scattering transform (J=2, L=8 Morlet filters: 81 channels
  at 1/4 resolution; ``models.scatter.Scattering2D``) in front of a small DP-trained head
  (GroupNorm, weight-standardised 3x3 convolution, GroupNorm, ReLU, pool, linear; 12 k
  parameters for 4 findings; ``models.scatter.ScatterHead``). Tramer & Boneh (ICLR 2021):
  handcrafted ScatterNet features + a small model beat end-to-end DP CNNs at equal
  epsilon. The extractor is fixed by its definition: no data (public or private) enters it,
  so it costs no privacy; each site computes its own images' features once and keeps them
  in its own state folder (they are derived from patient images and stay at the site).

``train_params`` restricts which parameters DP-SGD trains (``all``, ``norms-head``: the
GroupNorm affines and the final linear layer, ``head``: the final layer only); the others
keep their seeded initial values, which every site and the server derive identically.

``plan_dp`` picks the batch size and number of rounds for a target epsilon from the
accountant (the noise multiplier follows from them), as in Sander et al. (ICML 2023, "TAN
without a burn"): for a fixed number of steps, utility tracks the total amount of noise
``eta = sigma / (q sqrt(S))`` (sigma noise multiplier, q sample rate, S steps), so the plan is
the candidate with the smallest eta among those with enough steps to train and a bounded
compute cost.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import ConfigError

__all__ = [
    "RECIPES",
    "TRAIN_PARAMS",
    "DPPlan",
    "augmented_views",
    "feature_extractor",
    "plan_dp",
    "select_trainable",
    "site_inputs",
]

RECIPES = ("end-to-end", "scatter")
TRAIN_PARAMS = ("all", "norms-head", "head")
SCATTER_J, SCATTER_L = 2, 8


def feature_extractor(recipe: str) -> Any:
    """The frozen extractor of ``recipe`` (a torch module in eval mode), or None."""
    if recipe == "end-to-end":
        return None
    if recipe == "scatter":
        from privmed.models.scatter import Scattering2D

        return Scattering2D(SCATTER_J, SCATTER_L).eval()
    raise ConfigError(f"recipe: expected one of {', '.join(RECIPES)}, got {recipe!r}")


def select_trainable(model: Any, which: str) -> Any:
    """Freeze (``requires_grad = False``) every parameter outside ``which``; returns model."""
    from torch import nn

    if which == "all":
        return model
    if which not in TRAIN_PARAMS:
        raise ConfigError(f"train-params: expected one of {', '.join(TRAIN_PARAMS)}, got {which!r}")
    head = getattr(model, "head", None)
    if not isinstance(head, nn.Module):
        raise ConfigError(f"train-params {which}: model {type(model).__name__} has no 'head' layer")
    keep = {id(p) for p in head.parameters()}
    if which == "norms-head":
        for module in model.modules():
            if isinstance(module, nn.GroupNorm):
                keep |= {id(p) for p in module.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return model


MAX_VIEWS = 6


def _shift(x: np.ndarray, axis: int, by: int) -> np.ndarray:
    """Shift the images along ``axis`` by ``by`` pixels, filling with the reflected border."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (max(by, 0), max(-by, 0))
    padded = np.pad(x, pad, mode="reflect")
    start = max(-by, 0)
    return np.take(padded, range(start, start + x.shape[axis]), axis=axis)


def augmented_views(x: np.ndarray, views: int) -> np.ndarray:
    """(N, C, H, W) -> (N, views, C, H, W): the image, its left-right mirror, then shifts by
    2 pixels (down, right, up, left). Deterministic (no randomness), label-preserving for
    the chest findings; the view axis is what ``local.client_update`` averages per example
    (augmentation multiplicity)."""
    if not 1 <= views <= MAX_VIEWS:
        raise ConfigError(f"augmentation multiplicity: expected 1..{MAX_VIEWS} views, got {views}")
    makers = [
        lambda a: a,
        lambda a: a[..., ::-1],
        lambda a: _shift(a, 2, 2),
        lambda a: _shift(a, 3, 2),
        lambda a: _shift(a, 2, -2),
        lambda a: _shift(a, 3, -2),
    ]
    return np.stack([np.ascontiguousarray(m(x)) for m in makers[:views]], axis=1).astype(np.float32)


def _features(extractor: Any, x: np.ndarray, chunk: int = 128) -> np.ndarray:
    """Features of (N, C, H, W) images, or of (N, V, C, H, W) views (kept as (N, V, ...))."""
    import torch

    if x.ndim == 5:
        flat = _features(extractor, x.reshape(-1, *x.shape[2:]), chunk)
        return flat.reshape(x.shape[0], x.shape[1], *flat.shape[1:])
    with torch.no_grad():
        parts = [extractor(torch.as_tensor(x[i : i + chunk])).numpy() for i in range(0, len(x), chunk)]
    return np.concatenate(parts).astype(np.float32)


def site_inputs(recipe: str, data: Any, cache_dir: str | Path | None, views: int = 1) -> Any:
    """``data`` (a ``SiteData``) with the training images expanded to ``views`` augmented
    views (``augmented_views``, if views > 1) and all images replaced by the recipe's
    frozen features.

    Cached in ``cache_dir/features-<key>.npz``, ``key`` = SHA-256 of (recipe, data-set
    fingerprint, image shape, the image ids' split), and recomputed if the file does not
    match the arrays' shapes. The cache belongs to the site (derived from its images).
    """
    if views > 1:
        data = replace(data, x_train=augmented_views(data.x_train, views))
    if recipe == "end-to-end":
        return data
    key_text = f"{recipe}|{SCATTER_J}|{SCATTER_L}|{data.fingerprint}|{data.x_train.shape}|{data.x_test.shape}"
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"features-{key}.npz" if cache_dir is not None and data.fingerprint else None
    if path is not None and path.exists():
        with np.load(path) as z:
            train, test = z["train"], z["test"]
        if len(train) == data.n_train and len(test) == data.n_test:
            return replace(data, x_train=train, x_test=test)
    extractor = feature_extractor(recipe)
    train, test = _features(extractor, data.x_train), _features(extractor, data.x_test)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, train=train, test=test)
        tmp.replace(path)
    return replace(data, x_train=train, x_test=test)


@dataclass(frozen=True)
class DPPlan:
    """A DP schedule for one budget: what the sites run and why."""

    batch_size: int
    rounds: int
    local_epochs: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    eta: float
    reason: str


# Candidates: expected Poisson batch and rounds (1 local epoch each). At least MIN_STEPS
# optimizer steps so the head converges; at most MAX_EPOCHS passes over the data (compute).
BATCHES = (16, 32, 64, 128, 256)
ROUNDS = (10, 15, 20)
MIN_STEPS = 20
MAX_EPOCHS = 20


def plan_dp(epsilon: float, delta: float, n_train: int, *, max_grad_norm: float = 1.0) -> DPPlan:
    """The batch size and rounds with the smallest total amount of noise for (epsilon, delta)
    at a site of ``n_train`` training images (the smallest site: it needs the most noise).

    For each candidate the noise multiplier is calibrated exactly as the sites will
    (``privacy.calibrate_noise_multiplier``); candidates needing a noise multiplier below
    the refusal floor are skipped. ConfigError if none fits.
    """
    from privmed.federated.config import MIN_NOISE_MULTIPLIER, DPConfig
    from privmed.federated.privacy import calibrate_noise_multiplier, sampling_schedule

    dp = DPConfig(epsilon, delta, max_grad_norm)
    dp.check()
    best: tuple[float, DPPlan] | None = None
    tried = []
    for batch in BATCHES:
        if batch > n_train / 2:
            continue
        for rounds in ROUNDS:
            q, steps_per_round = sampling_schedule(n_train, batch, 1)
            steps = rounds * steps_per_round
            if steps < MIN_STEPS or rounds > MAX_EPOCHS:
                continue
            try:
                sigma = calibrate_noise_multiplier(dp, q, steps)
            except ConfigError:
                continue
            if sigma < MIN_NOISE_MULTIPLIER:
                continue
            eta = sigma / (q * math.sqrt(steps))
            tried.append(f"batch {batch} x {rounds} rounds: sigma {sigma:.2f}, eta {eta:.3f}")
            plan = DPPlan(batch, rounds, 1, sigma, q, steps, eta, "")
            if best is None or eta < best[0] - 1e-9:
                best = (eta, plan)
    if best is None:
        raise ConfigError(
            f"DP plan: no batch size / rounds schedule reaches epsilon={epsilon:g} at n={n_train}"
            f" with noise multiplier >= {MIN_NOISE_MULTIPLIER}"
        )
    plan = best[1]
    reason = (
        f"epsilon={epsilon:g} delta={delta:g}, smallest site n={n_train}: batch {plan.batch_size}"
        f" (sample rate {plan.sample_rate:.3f}) x {plan.rounds} rounds = {plan.steps} steps at noise"
        f" multiplier {plan.noise_multiplier:.3f} has the least total noise eta = sigma / (q sqrt(steps))"
        f" = {plan.eta:.3f} of {len(tried)} schedules with >= {MIN_STEPS} steps and <= {MAX_EPOCHS} epochs"
        " (Sander et al. 2023)"
    )
    return replace(plan, reason=reason)
