"""Optimisation-based gradient inversion ("Inverting Gradients", Geiping et al. 2020).

Given the update the server observed and the public round parameters, find images whose
simulated update points in the same direction:

    minimise_x  1 - cos(simulate_update(x), observed)  +  tv_weight * TV(x),   x in [0, 1]

Steps (per restart):

1. Draw ``x`` uniformly in ``[0, 1]`` from the seeded generator, and one label assignment
   consistent with the recovered label counts (``labels.assign_labels``).
2. Run ``iterations`` steps of Adam on the *signed* gradient of the objective (Geiping et
   al. use sign descent for stability), with the step size divided by 10 at 3/8, 5/8 and 7/8
   of the run; after each step project ``x`` back into the box ``[0, 1]``.
3. Keep the restart whose final objective is lowest. The attacker never sees the ground
   truth, so restarts are ranked by the objective only.

The cosine is taken over all trainable parameters concatenated (Geiping et al., eq. 4),
so it does not care how the update was scaled (learning rate, number of examples, the
per-sample clipping factor at batch size 1). An aggregate of several sites is inverted by
simulating every site on its own block of candidate images and aggregating with the same
public weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from privmed.attacks.updates import SiteProtocol, aggregate_updates, attacker_state, simulate_update
from privmed.errors import InputError

INITS = ("uniform", "prior")


@dataclass(frozen=True)
class InversionConfig:
    """Attacker's optimisation budget and prior.

    Attributes
    ----------
    iterations : optimisation steps per restart.
    restarts : independent random initialisations; the best objective wins.
    step_size : initial Adam step size (on signed gradients, in image units).
    tv_weight : weight of the anisotropic total-variation prior.
    init : "uniform" (noise in [0, 1], as Geiping et al.) or "prior" (the prior image plus
        uniform noise of amplitude 0.1: an attacker who knows what images look like).
    match_moments : give every candidate image the prior's intensity mean and std
        (see ``to_image``); otherwise optimise raw pixels clamped to ``[0, 1]``.
    """

    iterations: int = 400
    restarts: int = 2
    step_size: float = 0.1
    tv_weight: float = 1e-2
    prior_weight: float = 0.0
    init: str = "uniform"
    match_moments: bool = True
    scales: tuple[int, ...] = (4, 2, 1)

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise InputError(f"inversion init: expected one of {', '.join(INITS)}, got {self.init!r}")
        if not self.scales or any(f < 1 for f in self.scales) or self.scales[-1] != 1:
            raise InputError(f"inversion scales: expected downsampling factors ending in 1, got {self.scales}")
        if self.iterations < 1 or self.restarts < 1 or self.step_size <= 0 or self.tv_weight < 0:
            raise InputError(
                f"inversion: expected iterations >= 1, restarts >= 1, step_size > 0, "
                f"tv_weight >= 0, got {self.iterations}, {self.restarts}, {self.step_size}, {self.tv_weight}"
            )


@dataclass
class Inversion:
    """Result of ``invert_update``: best images ``(N, C, H, W)`` in ``[0, 1]`` and objectives."""

    images: np.ndarray
    labels: np.ndarray
    objective: float
    restart_objectives: list[float] = field(default_factory=list)


def cosine_distance(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """``1 - <a, b> / (|a| |b|)`` over the concatenation of all tensors (0 = same direction)."""
    dot = sum((x * y).sum() for x, y in zip(a, b, strict=True))
    norm_a = torch.sqrt(sum((x * x).sum() for x in a))  # type: ignore[arg-type]
    norm_b = torch.sqrt(sum((y * y).sum() for y in b))  # type: ignore[arg-type]
    return 1.0 - dot / (norm_a * norm_b + 1e-12)  # type: ignore[operator]


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontally and vertically adjacent pixels."""
    return (x[..., :, 1:] - x[..., :, :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()


@dataclass(frozen=True)
class ImagePrior:
    """What the attacker knows about model inputs without any update.

    ``image`` is ``(C, H, W)``: the mean of inputs the attack never targets (public data).
    ``mean`` and ``std`` are their average per-image intensity mean and standard deviation
    (exactly 0 and 1 under the federated trainer's per-image z-score preprocessing, which
    is public). ``low`` and ``high`` bound their pixel values (the box constraint).
    """

    image: np.ndarray
    mean: float
    std: float
    low: float
    high: float

    @classmethod
    def from_images(cls, images: np.ndarray) -> ImagePrior:
        """Prior from a ``(N, C, H, W)`` batch of inputs the attack does not target."""
        batch = np.asarray(images, dtype=np.float64)
        if batch.ndim != 4 or batch.shape[0] < 1:
            raise InputError(f"prior: expected a non-empty (N, C, H, W) batch, got {batch.shape}")
        return cls(
            image=batch.mean(axis=0).astype(np.float32),
            mean=float(batch.mean(axis=(1, 2, 3)).mean()),
            std=float(batch.std(axis=(1, 2, 3)).mean()),
            low=float(batch.min()),
            high=float(batch.max()),
        )


def to_image(z: torch.Tensor, prior: ImagePrior, match_moments: bool) -> torch.Tensor:
    """Map optimisation variables to candidate inputs inside ``[prior.low, prior.high]``.

    Without moment matching the variables are the pixels. With it, each image is
    standardised and given the prior's intensity mean and std: normalisation layers
    (GroupNorm, BatchNorm) make the update blind to a per-image affine change of intensity,
    so the attacker fixes that free scale from the known preprocessing instead of letting it
    drift.
    """
    if match_moments:
        axes = tuple(range(1, z.ndim))
        centred = z - z.mean(dim=axes, keepdim=True)
        z = prior.mean + prior.std * centred / (centred.pow(2).mean(dim=axes, keepdim=True).sqrt() + 1e-6)
    return z.clamp(prior.low, prior.high)


def _objective(
    model: nn.Module,
    state: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]],
    x: torch.Tensor,
    labels: torch.Tensor,
    observed: Sequence[torch.Tensor],
    protocol: SiteProtocol,
    site_sizes: Sequence[int],
    tv_weight: float,
    prior_term: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    params, buffers = state
    site_updates = []
    start = 0
    for size in site_sizes:
        block = slice(start, start + size)
        site_updates.append(simulate_update(model, params, buffers, x[block], labels[block], protocol))
        start += size
    simulated = site_updates[0] if len(site_updates) == 1 else aggregate_updates(site_updates, site_sizes)
    value = cosine_distance(simulated, observed) + tv_weight * total_variation(x)
    return value if prior_term is None else value + prior_term(x)


def _upsample(z: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    if tuple(z.shape[2:]) == tuple(shape):
        return z
    return F.interpolate(z, size=tuple(shape), mode="bilinear", align_corners=False)


def _optimise(
    objective: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    config: InversionConfig,
    prior: ImagePrior,
    tick: Callable[[float], None],
) -> torch.Tensor:
    """Coarse-to-fine signed Adam on ``objective(to_image(upsampled z))``; returns final z."""
    full = tuple(z0.shape[2:])
    z = z0
    for stage, factor in enumerate(config.scales):
        coarse = tuple(max(1, side // factor) for side in full)
        z = F.interpolate(z.detach(), size=coarse, mode="area") if coarse != tuple(z.shape[2:]) else z.detach()
        z.requires_grad_(True)
        steps = config.iterations // len(config.scales) + (stage < config.iterations % len(config.scales))
        optimizer = torch.optim.Adam([z], lr=config.step_size * prior.std)
        schedule = torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[math.floor(steps * f) for f in (3 / 8, 5 / 8, 7 / 8)], gamma=0.1
        )
        for _ in range(steps):
            value = objective(to_image(_upsample(z, full), prior, config.match_moments))
            (grad,) = torch.autograd.grad(value, [z])
            z.grad = grad.sign()
            optimizer.step()
            schedule.step()
            if not config.match_moments:
                with torch.no_grad():
                    z.clamp_(prior.low, prior.high)
            tick(float(value.detach()))
        z = _upsample(z.detach(), full)
    return z


def invert_update(
    model: nn.Module,
    observed: Sequence[torch.Tensor],
    protocol: SiteProtocol,
    site_sizes: Sequence[int],
    prior: ImagePrior,
    draw_labels: Callable[[np.random.Generator], np.ndarray],
    config: InversionConfig,
    generator: torch.Generator,
    rng: np.random.Generator,
    progress: Callable[[int, int, float], None] | None = None,
) -> Inversion:
    """Reconstruct the images behind ``observed`` (see the module docstring for the steps).

    Parameters
    ----------
    model : the global model the sites started from (not modified).
    observed : the update the server saw, in ``trainable_names(model)`` order.
    protocol : the sites' public round parameters.
    site_sizes : images per site behind ``observed`` (one entry without aggregation).
    prior : the attacker's image prior; its image fixes the shape ``(C, H, W)``.
    draw_labels : returns an ``(sum(site_sizes), K)`` label matrix per restart.
    config : optimisation budget, TV weight, initialisation, scales, moment matching.
    generator, rng : seeded sources for image initialisation and label assignment.
    progress : called as ``progress(step, total_steps, objective)`` every 50 steps.
    """
    n_images = int(sum(site_sizes))
    state = attacker_state(model)
    observed = [u.detach() for u in observed]
    if len(observed) != len(state[0]):
        raise InputError(f"inversion: expected {len(state[0])} update tensors, got {len(observed)}")
    prior_image = torch.from_numpy(np.asarray(prior.image, dtype=np.float32))
    # TV is measured on the [low, high] -> [0, 1] scale so that its weight is unit-free.
    tv_weight = config.tv_weight / max(prior.high - prior.low, 1e-12)
    prior_term = None
    if config.prior_weight > 0:
        scale = config.prior_weight / max(prior.std, 1e-12) ** 2

        def prior_term(x: torch.Tensor) -> torch.Tensor:
            return scale * (x - prior_image).pow(2).mean()

    total = config.iterations * config.restarts
    done = [0]

    def tick(value: float) -> None:
        done[0] += 1
        if progress is not None and (done[0] % 50 == 0 or done[0] == total):
            progress(done[0], total, value)

    best: Inversion | None = None
    objectives: list[float] = []
    for _ in range(config.restarts):
        labels = torch.from_numpy(draw_labels(rng)).float()
        if labels.shape != (n_images, labels.shape[1]) or labels.ndim != 2:
            raise InputError(f"inversion: expected labels for {n_images} images, got {tuple(labels.shape)}")

        def objective(x: torch.Tensor, labels: torch.Tensor = labels) -> torch.Tensor:
            return _objective(model, state, x, labels, observed, protocol, site_sizes, tv_weight, prior_term)

        noise = torch.rand((n_images, *prior_image.shape), generator=generator)
        if config.init == "prior":
            z0 = prior_image + 0.2 * prior.std * (noise - 0.5)
        else:
            z0 = prior.low + (prior.high - prior.low) * noise
        x = to_image(_optimise(objective, z0, config, prior, tick), prior, config.match_moments).detach()
        # Second-order autograd inside the objective needs grad mode even for evaluation.
        value = float(objective(x).detach())
        objectives.append(value)
        if best is None or value < best.objective:
            best = Inversion(x.numpy().copy(), labels.numpy().copy(), value)
    assert best is not None  # restarts >= 1 is checked by InversionConfig
    best.restart_objectives = objectives
    return best
