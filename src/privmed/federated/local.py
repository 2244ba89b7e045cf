"""What one site computes and sends in one round: ``client_update`` (pure, no I/O).

``client_update(model, global_arrays, x, y, training, dp=...)`` loads the global weights
into a private copy of ``model``, trains locally, and returns ``SiteUpdate.delta`` =
local weights - global weights: exactly the vector a site hands to SecAgg+ (which then
masks and quantises it; without SecAgg+ the server sees it as is). The attack module
imports this function to measure what the update leaks.

Local training: SGD (momentum 0.9) on a masked multi-label BCE, where each sample's loss
is the sum over its known labels divided by the number of findings, so that a sample's
loss (and gradient) depends on that sample alone, as per-sample clipping requires.

With ``dp``: DP-SGD (Abadi et al. 2016): Poisson sampling with rate q = 1/ceil(n/batch)
over ceil(n/batch) steps per epoch, per-sample gradient clipping to ``max_grad_norm`` and
Gaussian noise of std ``noise_multiplier * max_grad_norm`` on each summed batch gradient.
Opacus runs the per-sample gradients, the clipping and the RDP accountant; the sampling
and the noise come from ``privmed.federated.noise``, i.e. from the crypto PRG (AES-128-CTR)
keyed by 16 bytes of ``os.urandom`` per call, with the floating-point mitigation of
Holohan & Braghin (2021) on the Gaussian (each coordinate = sum of 4 draws / 2). The
accountant is stepped with the same q the sampler uses, once per step taken, so the
privacy history is exactly ``privacy.sampling_schedule``. The model must not mix samples
(GroupNorm, not BatchNorm; ModelError otherwise). In-place activations and MONAI's in-place
residual additions are switched to out-of-place ops on the private copy, because Opacus'
backward hooks forbid in-place edits of hooked outputs; the function computed is unchanged.

Security: the noise and the batches are unpredictable to anyone without the AES key, which
never leaves this function. Not guaranteed: the Gaussian is a float64 computation (Box-Muller
on 53-bit uniforms, |draw| <= 8.57), hardened by the 4-sum against the floating-point attack
(Mironov 2012; Jin et al. 2021), not an exact discrete Gaussian sampler.
``insecure_noise_seed`` derives the key from an integer (``noise.insecure_seeded_prg``):
reproducible, for tests and attack studies only.
"""

from __future__ import annotations

import copy
import math
import types
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from privmed.errors import InputError, ModelError
from privmed.federated.arrays import get_arrays, set_arrays, subtract_arrays
from privmed.federated.config import MIN_NOISE_MULTIPLIER

__all__ = ["DPSGD", "LocalTraining", "SiteUpdate", "client_update", "predict_proba"]

MOMENTUM = 0.9


@dataclass(frozen=True)
class LocalTraining:
    """Local SGD schedule of one round."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05


@dataclass(frozen=True)
class DPSGD:
    """Per-round DP-SGD parameters (the budget and its accounting live in ``privacy``)."""

    noise_multiplier: float
    max_grad_norm: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise InputError(f"DP-SGD: expected a finite clipping norm > 0, got {self.max_grad_norm}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= MIN_NOISE_MULTIPLIER):
            raise InputError(
                f"DP-SGD: expected noise multiplier >= {MIN_NOISE_MULTIPLIER}, got"
                f" {self.noise_multiplier} (smaller is DP in name only)"
            )


@dataclass(frozen=True)
class SiteUpdate:
    """One site's contribution to one round.

    delta : local - global, float32, in ``federated_names`` order (what is sent).
    num_examples : training images (the FedAvg weight; visible to the server).
    train_loss : mean training loss of the round (kept at the site under DP).
    steps : optimizer steps taken.
    privacy_history : Opacus accountant history of this round, [(sigma, q, steps)]; [] without DP.
    """

    delta: list[np.ndarray]
    num_examples: int
    train_loss: float
    steps: int
    privacy_history: list[tuple[float, float, int]] = field(default_factory=list)


def _masked_bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of each sample's BCE summed over known labels / number of labels."""
    known = ~torch.isnan(y)
    target = torch.where(known, y, torch.zeros_like(y))
    per = nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    per_sample = (per * known).sum(dim=1) / y.shape[1]
    return per_sample.mean()


def _residual_forward_out_of_place(block: Any, x: torch.Tensor) -> torch.Tensor:
    """MONAI ResNetBlock / ResNetBottleneck forward with ``out + residual`` instead of ``+=``."""
    residual = x
    out = block.act(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    if hasattr(block, "conv3"):
        out = block.bn3(block.conv3(block.act(out)))
    if block.downsample is not None:
        residual = block.downsample(x)
    return block.act(out + residual)


def prepare_for_opacus(model: nn.Module) -> nn.Module:
    """Make ``model`` (in place) safe for Opacus hooks; raise ModelError if it mixes samples."""
    from opacus.validators import ModuleValidator

    from privmed.models.scatter import register_opacus_grad_sampler

    register_opacus_grad_sampler()  # weight-standardised convolutions (scatter recipe)
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ModelError(
            f"DP-SGD: model is not per-sample compatible ({type(errors[0]).__name__}: "
            f"{errors[0]}); build it with norm='group'"
        )
    for module in model.modules():
        if hasattr(module, "inplace") and isinstance(module.inplace, bool):
            module.inplace = False
        if type(module).__name__ in ("ResNetBlock", "ResNetBottleneck") and type(
            module
        ).__module__.startswith("monai."):
            module.forward = types.MethodType(_residual_forward_out_of_place, module)  # type: ignore[method-assign]
    return model


def client_update(
    model: nn.Module,
    global_arrays: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    training: LocalTraining,
    *,
    dp: DPSGD | None = None,
    data_seed: int = 0,
    insecure_noise_seed: int | None = None,
) -> SiteUpdate:
    """Train a copy of ``model`` from ``global_arrays`` on (x, y) and return the update.

    Parameters
    ----------
    model : architecture; not modified (a deep copy is trained).
    global_arrays : global weights in ``federated_names(model)`` order.
    x : float32 (N, C, H, W) images, or (N, V, C, H, W) with V augmented views of each image
        (augmentation multiplicity, De et al. 2022: an example's gradient is the mean over its
        views, clipped as one example, so the privacy accounting is unchanged);
        y : float32 (N, K) labels, nan = unknown.
    training : epochs, batch size, learning rate.
    dp : DP-SGD parameters, or None for plain SGD.
    data_seed : seeds the shuffling of plain SGD (DP sampling is from the crypto PRG).
    insecure_noise_seed : if set, the PRG key for DP sampling and noise is derived from it
        (``noise.insecure_seeded_prg``; reproducible, therefore insecure: tests and attack
        studies only). None (the default): a fresh key from ``os.urandom``.

    Returns
    -------
    SiteUpdate with ``delta`` = trained - global (float32), the steps taken and, with DP,
    the Opacus accountant history of exactly these steps.
    """
    x_t = torch.as_tensor(np.asarray(x, dtype=np.float32))
    y_t = torch.as_tensor(np.asarray(y, dtype=np.float32))
    if x_t.ndim < 3 or y_t.ndim != 2 or x_t.shape[0] != y_t.shape[0] or x_t.shape[0] < 1:
        raise InputError(
            f"client_update: expected x (N, C, ...) and y (N, K) with N >= 1, got {tuple(x_t.shape)}"
            f" and {tuple(y_t.shape)}"
        )
    local = copy.deepcopy(model)
    set_arrays(local, global_arrays)
    local.train()
    dataset = torch.utils.data.TensorDataset(x_t, y_t)
    optimizer = torch.optim.SGD(local.parameters(), lr=training.lr, momentum=MOMENTUM)
    if dp is None:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=training.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(data_seed),
        )
        loss_sum, steps = _run_epochs(local, optimizer, loader, training.epochs)
        return SiteUpdate(
            delta=subtract_arrays(get_arrays(local), global_arrays),
            num_examples=len(dataset),
            train_loss=loss_sum / max(steps, 1),
            steps=steps,
        )

    from opacus import PrivacyEngine

    from privmed.crypto.prg import PRG
    from privmed.federated.noise import (
        NOISE_LABEL,
        SAMPLING_LABEL,
        PoissonSampler,
        insecure_seeded_prg,
        install_prg_noise,
    )

    prepare_for_opacus(local)
    prg = PRG.fresh() if insecure_noise_seed is None else insecure_seeded_prg(insecure_noise_seed)
    # Opacus reads the schedule off this loader and never iterates it: batches come from the
    # PoissonSampler below.
    schedule_loader = torch.utils.data.DataLoader(dataset, batch_size=training.batch_size)
    batches_per_epoch = len(schedule_loader)  # ceil(n / batch), as privacy.sampling_schedule
    sample_rate = 1.0 / batches_per_epoch
    with warnings.catch_warnings():
        # about Opacus' own RNG, which is not used: sampling and noise come from the PRG
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    private_model, private_opt, _ = engine.make_private(
        module=local,
        optimizer=optimizer,
        data_loader=schedule_loader,
        noise_multiplier=dp.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        poisson_sampling=True,
    )
    install_prg_noise(private_opt, prg.stream(NOISE_LABEL))
    # Opacus' hook would account 1 / len(its DPDataLoader) = 1 / int(1 / q), which is not q
    # for some batch counts (93, 99, ...); account exactly the rate the sampler uses. The
    # optimizer holds one step hook, so this replaces make_private's (pinned by a test).
    private_opt.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    sampler = PoissonSampler(
        prg.stream(SAMPLING_LABEL), num_samples=len(dataset), sample_rate=sample_rate, steps=batches_per_epoch
    )
    try:
        with warnings.catch_warnings():
            # the first layer's input needs no gradient: Opacus' full backward hook says so
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss_sum, steps = _run_epochs(
                private_model, private_opt, _IndexedBatches((x_t, y_t), sampler), training.epochs
            )
    finally:
        private_model.remove_hooks()
    return SiteUpdate(
        delta=subtract_arrays(get_arrays(local), global_arrays),
        num_examples=len(dataset),
        train_loss=loss_sum / max(steps, 1),
        steps=steps,
        privacy_history=[(float(s), float(q), int(t)) for s, q, t in engine.accountant.history],
    )


class _IndexedBatches:
    """Re-iterable (x[idx], y[idx]) batches over the index tensors of a batch sampler; an
    empty index gives (0, ...) tensors, as Opacus' collate does for an empty Poisson batch."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], batch_sampler: Iterable[torch.Tensor]) -> None:
        self.tensors = tensors
        self.batch_sampler = batch_sampler

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for indices in self.batch_sampler:
            yield tuple(t[indices] for t in self.tensors)


def _average_views(model: nn.Module, views: int) -> None:
    """Per-sample gradients of (B * views) rows -> (B) examples: the mean over each example's
    views (rows ``b * views .. b * views + views - 1``), before Opacus clips per example."""
    for p in model.parameters():
        grad_sample = getattr(p, "grad_sample", None)
        if isinstance(grad_sample, torch.Tensor):
            p.grad_sample = grad_sample.reshape(-1, views, *grad_sample.shape[1:]).mean(dim=1)  # type: ignore[attr-defined]


def _run_epochs(
    model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable[Any], epochs: int
) -> tuple[float, int]:
    loss_sum, steps = 0.0, 0
    for _ in range(epochs):
        for xb, yb in loader:
            views = xb.shape[1] if xb.ndim == 5 else 1
            if views > 1:  # (B, V, C, H, W) -> B * V rows, each row with its example's labels
                xb, yb = xb.reshape(-1, *xb.shape[2:]), yb.repeat_interleave(views, dim=0)
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            # A Poisson batch can be empty: the step still happens (noise, accounting).
            loss = _masked_bce(logits, yb) if xb.shape[0] else logits.sum() * 0.0
            loss.backward()
            if views > 1:
                _average_views(model, views)
            optimizer.step()
            loss_sum += float(loss.detach())
            steps += 1
    return loss_sum, steps


@torch.no_grad()
def predict_proba(model: nn.Module, x: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Sigmoid probabilities (N, K) of ``model`` in eval mode (training flag restored)."""
    was_training = model.training
    model.eval()
    try:
        out = [
            torch.sigmoid(model(torch.as_tensor(np.asarray(x[i : i + batch_size], np.float32)))).numpy()
            for i in range(0, len(x), batch_size)
        ]
    finally:
        model.train(was_training)
    return np.concatenate(out).astype(np.float64)
