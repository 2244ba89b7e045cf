"""What a site sends in one federated round, and the attacker's differentiable copy of it.

Two functions compute the same quantity from two sides:

- ``site_update`` is the *real* message. It calls ``privmed.federated.local.client_update``,
  the very function a ``privmed federate`` site runs: a copy of the global model trained
  for ``local_steps`` epochs of SGD (momentum 0.9) on the site's images, optionally as
  DP-SGD through Opacus (Poisson sampling, per-sample clipping to ``clip_norm``, Gaussian
  noise of std ``dp_sigma * clip_norm`` on the summed clipped gradients; Abadi et al. 2016).
  The site's data is the attacked batch and its batch size is the whole batch, so an epoch
  is one step (with DP, Poisson sampling at rate 1 keeps every image). The message is the
  parameter difference ``delta = w_after - w_before``.
- ``simulate_update`` is the attacker's model of that message as a differentiable function
  of candidate images: the same forward pass, loss and unrolled SGD-with-momentum steps,
  without clipping or noise (the attacker does not know the noise; at batch size 1 clipping
  only rescales the update, which the cosine objective ignores).

``aggregate_updates`` is what secure aggregation reveals: the FedAvg-weighted mean of the
site updates (``privmed.federated.arrays.weighted_average``; SecAgg+ reproduces it up to a
quantisation error of about 2^-21 of its clipping range, negligible here) and nothing about
any single site (Bonawitz et al. 2017; Bell et al. 2020).

The loss is the federated trainer's: binary cross-entropy with logits, per sample summed
over findings and divided by their number, averaged over the batch (attacked images have
all labels known). Only trainable parameters are attacked; BatchNorm running statistics,
which a FedAvg round also ships and which leak batch means too, are left out (DP models use
GroupNorm and have none).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from privmed.errors import InputError

MOMENTUM = 0.9  # privmed.federated.local.MOMENTUM; checked equal in the tests


@dataclass(frozen=True)
class SiteProtocol:
    """The public parameters of one site's round (known to the server, hence the attacker).

    Attributes
    ----------
    local_steps : local SGD steps (epochs over the site's batch) before the site sends.
    lr : local SGD learning rate (momentum 0.9, as ``privmed federate``).
    dp_sigma : DP-SGD noise multiplier; 0 turns DP off (no clipping, no noise). Values in
        ``(0, 0.3)`` are refused by ``privmed federate`` as DP in name only.
    clip_norm : per-sample L2 clipping bound of DP-SGD (ignored when ``dp_sigma == 0``).
    """

    local_steps: int = 1
    lr: float = 0.05
    dp_sigma: float = 0.0
    clip_norm: float = 1.0

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise InputError(f"local steps: expected >= 1, got {self.local_steps}")
        if self.lr <= 0 or self.clip_norm <= 0 or self.dp_sigma < 0:
            raise InputError(
                f"site protocol: expected lr > 0, clip_norm > 0, dp_sigma >= 0, got "
                f"lr={self.lr}, clip_norm={self.clip_norm}, dp_sigma={self.dp_sigma}"
            )


def multilabel_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, mean over samples and findings (all labels known)."""
    return F.binary_cross_entropy_with_logits(logits, labels)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters a round trains, in ``named_parameters`` order."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


def site_update(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    protocol: SiteProtocol,
    noise_seed: int,
) -> list[torch.Tensor]:
    """The update one site sends for one round, per trainable parameter.

    ``images`` float32 ``(N, C, H, W)`` preprocessed as the federated trainer does,
    ``labels`` float32 ``(N, K)`` in {0, 1}. ``noise_seed`` seeds DP sampling and noise
    (``insecure_noise_seed``: reproducible, for attack studies only). ``model`` is the global
    model and is not modified.
    """
    from privmed.federated.arrays import federated_names, get_arrays
    from privmed.federated.local import DPSGD, LocalTraining, client_update

    x = np.asarray(images, dtype=np.float32)
    y = np.asarray(labels, dtype=np.float32)
    if x.ndim < 3 or y.ndim != 2 or x.shape[0] != y.shape[0] or np.isnan(y).any():
        raise InputError(
            f"site batch: expected images (N, C, ...) and known labels (N, K) with equal N, "
            f"got {x.shape} and {y.shape}"
        )
    training = LocalTraining(epochs=protocol.local_steps, batch_size=x.shape[0], lr=protocol.lr)
    dp = DPSGD(protocol.dp_sigma, protocol.clip_norm) if protocol.dp_sigma > 0 else None
    update = client_update(
        model, get_arrays(model), x, y, training, dp=dp, data_seed=noise_seed, insecure_noise_seed=noise_seed
    )
    by_name = dict(zip(federated_names(model), update.delta, strict=True))
    return [torch.from_numpy(np.asarray(by_name[n], dtype=np.float32)) for n in trainable_names(model)]


def aggregate_updates(
    updates: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]
) -> list[torch.Tensor]:
    """FedAvg-weighted mean ``sum_s w_s u_s / sum_s w_s`` of site updates (differentiable).

    The weights are the sites' public example counts. This is exactly what the server
    learns under secure aggregation.
    """
    if not updates or len(updates) != len(weights):
        raise InputError(f"aggregate: expected one weight per update, got {len(updates)} and {len(weights)}")
    total = float(sum(weights))
    return [
        sum(w * u[i] for u, w in zip(updates, weights, strict=True)) / total  # type: ignore[misc]
        for i in range(len(updates[0]))
    ]


def simulate_update(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    buffers: dict[str, torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    protocol: SiteProtocol,
) -> list[torch.Tensor]:
    """The attacker's differentiable replica of ``site_update`` without clipping or noise.

    ``params`` (leaf tensors with ``requires_grad``) are the global weights the server sent;
    the result is differentiable with respect to ``images`` (second-order autograd through
    ``local_steps`` unrolled steps of SGD with momentum 0.9, as PyTorch's SGD runs them:
    ``v = 0.9 v + g`` with ``v = g`` at the first step, ``w = w - lr v``; Geiping et al.
    2020, section 5).
    """
    names = list(params)
    current = dict(params)
    velocity: list[torch.Tensor] = []
    for step in range(protocol.local_steps):
        # Buffers are copied so that BatchNorm's running statistics stay untouched.
        state = {**current, **{n: b.clone() for n, b in buffers.items()}}
        loss = multilabel_loss(functional_call(model, state, (images,)), labels)
        grads = torch.autograd.grad(loss, [current[n] for n in names], create_graph=True)
        velocity = list(grads) if step == 0 else [MOMENTUM * v + g for v, g in zip(velocity, grads, strict=True)]
        current = {n: current[n] - protocol.lr * v for n, v in zip(names, velocity, strict=True)}
    return [current[n] - params[n] for n in names]


def attacker_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Detached copies of the global trainable parameters (requiring grad) and buffers."""
    names = set(trainable_names(model))
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if n in names}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return params, buffers
