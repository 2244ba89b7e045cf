"""Losses, validation metrics and augmentation used by training.

AUROC is scikit-learn's ``roc_auc_score`` per finding over the images whose label is known;
a finding with only one class among them has no AUROC (nan) and is left out of the mean.
Dice is computed per volume and per foreground class, then averaged over volumes; a class
absent from both the prediction and the truth of a volume has no Dice for that volume.
(Statistics with confidence intervals and DeLong tests live in ``privmed.evaluate``.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def masked_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits over the known (non-nan) labels only."""
    known = ~torch.isnan(target)
    per_label = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, torch.nan_to_num(target, nan=0.0), reduction="none"
    )
    return (per_label * known).sum() / known.sum().clamp(min=1)


def auroc_per_finding(
    scores: np.ndarray, labels: np.ndarray, findings: Sequence[str]
) -> dict[str, float]:
    """AUROC of ``scores[:, k]`` against ``labels[:, k]`` for each finding (nan if undefined)."""
    from sklearn.metrics import roc_auc_score

    result = {}
    for k, finding in enumerate(findings):
        known = ~np.isnan(labels[:, k])
        truth = labels[known, k]
        if truth.size == 0 or truth.min() == truth.max():
            result[finding] = math.nan
        else:
            result[finding] = float(roc_auc_score(truth, scores[known, k]))
    return result


def nanmean(values: dict[str, float]) -> float:
    """Mean of the defined values (nan when none is)."""
    defined = [v for v in values.values() if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def dice_per_class(
    predicted: np.ndarray, truth: np.ndarray, groups: Sequence[str], class_names: Sequence[str]
) -> dict[str, float]:
    """Mean over volumes of the Dice of each foreground class.

    ``predicted`` and ``truth`` are integer class maps ``(N, *spatial)``; rows with the same
    ``groups`` entry (slices of one volume) are pooled into one volume first.
    ``class_names[c - 1]`` names class ``c`` (class 0 is background).
    """
    order = list(dict.fromkeys(groups))
    rows = {g: [i for i, h in enumerate(groups) if h == g] for g in order}
    result = {}
    for c, name in enumerate(class_names, start=1):
        scores = []
        for g in order:
            p = predicted[rows[g]] == c
            t = truth[rows[g]] == c
            total = int(p.sum()) + int(t.sum())
            if total:
                scores.append(2.0 * int(np.logical_and(p, t).sum()) / total)
        result[name] = float(np.mean(scores)) if scores else math.nan
    return result


def intensity_augment(
    x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random per-image gamma, contrast and noise, mimicking scanner differences between sites.

    Each image is min-max scaled, given a gamma in [0.7, 1.4] and Gaussian noise of std up
    to 0.05, then mapped back to its own original mean and standard deviation, so the
    augmentation does not change the input distribution the preprocessing produces
    (z-scored images stay z-scored). Targets pass unchanged.
    """
    n = x.shape[0]
    dims = tuple(range(1, x.ndim))
    shape = (n,) + (1,) * (x.ndim - 1)
    lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
    mean, std = x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True)
    unit = (x - lo) / (hi - lo).clamp(min=1e-6)
    gamma = torch.exp((torch.rand(shape, generator=generator) * 2 - 1) * math.log(1.4))
    noise = 0.05 * torch.rand(shape, generator=generator)
    unit = unit.pow(gamma) + noise * torch.randn(x.shape, generator=generator)
    unit = (unit - unit.mean(dim=dims, keepdim=True)) / unit.std(dim=dims, keepdim=True).clamp(
        min=1e-6
    )
    return unit * std + mean, y
