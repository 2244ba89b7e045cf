"""Baselines for the same report: centrally pooled training and local-only training.

Both use the federated run's local trainer (``local.client_update``, plain SGD), the same
initial weights (seeded by ``config.seed``), the same train/test split and the same total
number of passes over each training image (``rounds * local_epochs`` epochs):

- central: one model trained on the union of all sites' training images (what pooling the
  data would give, the upper reference that federation tries to reach);
- local-only: each site trains on its own images alone and is scored on its own test
  images (what a site gets without any collaboration).

Scores are computed exactly as in the federated evaluation: per-site AUROC on each site's
held-out images and the pooled AUROC from summed score histograms.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from privmed.federated.config import FederatedConfig
from privmed.federated.sitedata import SiteData

log = logging.getLogger(__name__)

__all__ = ["central_baseline", "local_only_baseline", "initial_model"]


def initial_model(config: FederatedConfig) -> Any:
    """The run's model with its seeded initial weights (identical to round 0 of the run)."""
    import torch

    torch.manual_seed(config.seed)
    return config.build_model()


def _train(config: FederatedConfig, model: Any, x: np.ndarray, y: np.ndarray, seed: int) -> Any:
    from privmed.federated.arrays import add_arrays, get_arrays, set_arrays
    from privmed.federated.local import LocalTraining, client_update

    start = get_arrays(model)
    training = LocalTraining(config.rounds * config.local_epochs, config.batch_size, config.lr)
    update = client_update(model, start, x, y, training, data_seed=seed)
    set_arrays(model, add_arrays(start, update.delta))
    return model


def _score(model: Any, sites: Sequence[SiteData], pick: Callable[[SiteData], Any] | None = None) -> dict[str, Any]:
    """Per-site macro AUROC on each site's test images and pooled AUROC from histograms."""
    from privmed.federated.local import predict_proba
    from privmed.federated.metrics import (
        auroc_from_histograms,
        auroc_per_label,
        macro_mean,
        score_histograms,
    )

    per_site: dict[str, float] = {}
    pooled = None
    for data in sites:
        probs = predict_proba(pick(data) if pick else model, data.x_test)
        per_site[data.site] = macro_mean(auroc_per_label(data.y_test, probs))
        hist = score_histograms(data.y_test, probs)
        pooled = hist if pooled is None else pooled + hist
    pooled_auroc = auroc_from_histograms(pooled) if pooled is not None else []
    return {"pooled_auroc_macro": macro_mean(pooled_auroc), "sites": per_site}


def central_baseline(config: FederatedConfig, sites: Sequence[SiteData]) -> dict[str, Any]:
    """Train on all sites' pooled training images; score per site and pooled."""
    x = np.concatenate([d.x_train for d in sites])
    y = np.concatenate([d.y_train for d in sites])
    model = _train(config, initial_model(config), x, y, seed=config.seed)
    log.info("central baseline trained on %d images", len(x))
    return {"n_train": int(len(x)), **_score(model, sites)}


def local_only_baseline(config: FederatedConfig, sites: Sequence[SiteData]) -> dict[str, Any]:
    """Each site trains alone; each is scored on its own test images; pooled over sites."""
    models = {}
    for i, data in enumerate(sites):
        models[data.site] = _train(config, initial_model(config), data.x_train, data.y_train, seed=config.seed + 1 + i)
        log.info("local-only baseline for %s trained on %d images", data.site, data.n_train)
    return {"n_train": {d.site: d.n_train for d in sites}, **_score(None, sites, pick=lambda d: models[d.site])}
