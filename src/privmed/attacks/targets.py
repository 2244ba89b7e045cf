"""Attacked images and the attacker's prior, taken from a study exactly as sites see them.

Images go through ``privmed.federated.sitedata.load_site``: the same reader, resize and
per-image z-score that ``privmed federate`` trains on, and the same hash-based split.

- Targets: a site's *training* images with every label known (the federated loss masks
  unknown labels; the attack's label recovery assumes known ones).
- Prior: the *held-out test* images of all sites. They never enter an update, so their mean
  image is a fair "what an attacker knows without the update" (issue 7: the prior is the
  mean image). Each site's own held-out mean (``site_priors``) is the stronger baseline of
  a server that knows which site sent the update and what that site's images look like. Their pixel range also sets the fixed map from model-input units to the
  ``[0, 1]`` scale on which images are scored and drawn (``display``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from privmed.attacks.invert import ImagePrior
from privmed.errors import InputError

TEST_FRACTION = 0.2  # privmed federate's default held-out share


@dataclass(frozen=True)
class StudyImages:
    """Per-site training images/labels (known labels only) and the prior, in model units."""

    labels: tuple[str, ...]
    sites: tuple[str, ...]
    train_x: dict[str, np.ndarray]
    train_y: dict[str, np.ndarray]
    prior: ImagePrior
    n_prior: int
    site_priors: dict[str, np.ndarray] = field(default_factory=dict)  # (C, H, W) per site

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.prior.image.shape)


def load_study_images(root: str | Path, image_size: int) -> StudyImages:
    """Load every site of the study at ``root`` at ``image_size`` x ``image_size``."""
    from privmed.federated.sitedata import load_site, summarize_study

    summary = summarize_study(root, TEST_FRACTION)
    train_x: dict[str, np.ndarray] = {}
    train_y: dict[str, np.ndarray] = {}
    held_out: list[np.ndarray] = []
    for site in summary.sites:
        data = load_site(root, site, labels=summary.labels, image_size=image_size, test_fraction=TEST_FRACTION)
        known = ~np.isnan(data.y_train).any(axis=1)
        train_x[site], train_y[site] = data.x_train[known], data.y_train[known]
        held_out.append(data.x_test)
    return StudyImages(
        labels=summary.labels,
        sites=summary.sites,
        train_x=train_x,
        train_y=train_y,
        prior=ImagePrior.from_images(np.concatenate(held_out)),
        n_prior=int(sum(x.shape[0] for x in held_out)),
        site_priors={
            site: x.mean(axis=0).astype(np.float32)
            for site, x in zip(summary.sites, held_out, strict=True)
            if x.shape[0] > 0
        },
    )


def pick_batches(
    study: StudyImages, batch_size: int, n_sites: int, seed: int
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``batch_size`` training images (and labels) from each of the first ``n_sites`` sites.

    Site ``i``'s images depend only on ``(seed, batch_size, i)``, so configurations that
    differ only in DP noise or in the number of sites attack the same images.
    """
    if n_sites > len(study.sites):
        raise InputError(f"secagg sites: the study has {len(study.sites)} sites, asked for {n_sites}")
    xs, ys = [], []
    for index, site in enumerate(study.sites[:n_sites]):
        available = study.train_x[site].shape[0]
        if available < batch_size:
            raise InputError(
                f"site {site!r}: batch size {batch_size} needs {batch_size} training images "
                f"with known labels, the site has {available}"
            )
        rng = np.random.default_rng([seed, batch_size, index])
        chosen = np.sort(rng.choice(available, size=batch_size, replace=False))
        xs.append(study.train_x[site][chosen])
        ys.append(study.train_y[site][chosen])
    return xs, ys


def display(images: np.ndarray, prior: ImagePrior) -> np.ndarray:
    """Model-input units -> ``[0, 1]`` by the fixed map ``[prior.low, prior.high] -> [0, 1]``."""
    span = max(prior.high - prior.low, 1e-12)
    return np.clip((np.asarray(images, dtype=np.float64) - prior.low) / span, 0.0, 1.0)
