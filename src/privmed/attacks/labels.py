"""Label recovery from the classifier head's bias update.

With binary cross-entropy on logits ``z`` (mean over ``N`` samples and ``K`` findings), the
gradient of the head's bias for finding ``k`` is

    g_k = (1 / (N K)) * sum_i (sigmoid(z_ik) - y_ik).

- Batch size 1 (iDLG, Zhao et al. 2020, adapted from softmax to multi-label): since
  ``0 < sigmoid < 1``, ``g_k < 0`` exactly when ``y_k = 1``. Exact without DP noise.
- Larger batches (batch label restoration in the spirit of Yin et al. 2021, GradInversion,
  which reads class counts off the last layer for softmax): solving for the number of
  positives gives ``n_k = sum_i sigmoid(z_ik) - N K g_k``. The attacker does not know the
  images, so ``sum_i sigmoid(z_ik)`` is estimated as ``N * sigmoid(f(prior))_k`` with the
  prior image (the model at initialisation predicts nearly the same for every input), and
  ``n_k`` is rounded and clipped to ``[0, N]``. Which samples carry the positives is not
  identifiable from the bias; ``assign_labels`` draws one assignment per restart and the
  inversion keeps the restart that fits the update best.

A local update ``delta`` of ``s`` steps of SGD with momentum ``m`` is turned into a gradient
estimate ``-delta / (lr * sum_{t=1..s} (1 - m^t) / (1 - m))`` (exact for one step, and for
any ``s`` if the gradient stayed constant). Under DP the bias update is clipped and noised
like every other coordinate, so recovery degrades with the noise; that is part of what the
defence buys and is reported (``label_count_accuracy``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from privmed.attacks.updates import MOMENTUM, SiteProtocol, trainable_names
from privmed.errors import InputError


def head_bias_name(model: nn.Module, num_outputs: int) -> str:
    """Parameter name of the bias of the last ``nn.Linear`` with ``num_outputs`` outputs."""
    found = ""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_outputs and module.bias is not None:
            found = f"{name}.bias" if name else "bias"
    if not found:
        raise InputError(
            f"label recovery: expected a final nn.Linear with bias and {num_outputs} outputs, found none"
        )
    return found


@dataclass(frozen=True)
class LabelEstimate:
    """Recovered positives per finding (``counts``, shape ``(K,)``) for ``n_images`` images."""

    counts: np.ndarray
    n_images: int


def recover_label_counts(
    model: nn.Module,
    update: list[torch.Tensor],
    protocol: SiteProtocol,
    n_images: int,
    num_outputs: int,
    prior_image: torch.Tensor,
) -> LabelEstimate:
    """Number of positive images per finding, read from the head-bias part of ``update``.

    ``update`` is in ``trainable_names(model)`` order; ``n_images`` counts all images behind
    it (batch size times sites for an aggregate of equally sized sites); ``prior_image`` is
    ``(C, H, W)``.
    """
    names = trainable_names(model)
    bias = update[names.index(head_bias_name(model, num_outputs))].detach().double()
    steps = sum((1 - MOMENTUM**t) / (1 - MOMENTUM) for t in range(1, protocol.local_steps + 1))
    gradient = -bias / (protocol.lr * steps)
    if n_images == 1:
        return LabelEstimate(counts=(gradient < 0).numpy().astype(np.int64), n_images=1)
    with torch.no_grad():
        # Train mode, as the site computes its update (matters for BatchNorm).
        probe = copy.deepcopy(model).train()(prior_image[None].float())
    expected = torch.sigmoid(probe[0].double())
    counts = torch.round(n_images * (expected - num_outputs * gradient))
    return LabelEstimate(counts=counts.clamp(0, n_images).numpy().astype(np.int64), n_images=n_images)


def assign_labels(estimate: LabelEstimate, rng: np.random.Generator) -> np.ndarray:
    """A multi-hot ``(n_images, K)`` label matrix with ``counts[k]`` positives in column k.

    The positives of each finding go to images drawn uniformly without replacement.
    """
    labels = np.zeros((estimate.n_images, len(estimate.counts)), dtype=np.float32)
    for k, count in enumerate(estimate.counts):
        labels[rng.choice(estimate.n_images, size=int(count), replace=False), k] = 1.0
    return labels


def label_count_accuracy(estimate: LabelEstimate, true_labels: np.ndarray) -> float:
    """Fraction of findings whose positive count was recovered exactly."""
    truth = np.asarray(true_labels).sum(axis=0).astype(np.int64)
    if truth.shape != estimate.counts.shape:
        raise InputError(f"labels: expected {estimate.counts.shape} findings, got {truth.shape}")
    return float(np.mean(truth == estimate.counts))


def head_input(model: nn.Module, images: torch.Tensor, num_outputs: int) -> torch.Tensor:
    """What enters the head (the last ``nn.Linear`` with ``num_outputs`` outputs): ``(N, D)``.

    Computed in train mode, as the site does, on a copy (BatchNorm statistics stay untouched).
    """
    probe = copy.deepcopy(model).train()
    name = head_bias_name(probe, num_outputs).rsplit(".", 1)[0]
    head = probe.get_submodule(name) if name != "bias" else probe
    seen: list[torch.Tensor] = []
    head.register_forward_hook(lambda _m, args, _out: seen.append(args[0].detach()))
    with torch.no_grad():
        probe(images)
    return seen[0].flatten(1)


def recover_head_input(model: nn.Module, update: list[torch.Tensor], num_outputs: int) -> torch.Tensor:
    """The head's input, read off the head's own update (analytic, no optimisation).

    For a linear layer ``z = W h + b`` and any loss, the gradient is ``dW = sum_i d_i h_i^T``
    and ``db = sum_i d_i``. With one image, row ``k`` of ``dW`` is ``d_k h`` and ``db_k = d_k``,
    so ``h = dW[k] / db[k]`` exactly (Phong et al. 2017; Geiping et al. 2020, section 4);
    one SGD step scales both by ``-lr`` and the ratio is unchanged. The finding ``k`` with the
    largest ``|db_k|`` is used. With several images the ratio is a ``d``-weighted mixture of
    their inputs; DP noise on ``dW`` and ``db`` corrupts it. Returns ``(D,)``.
    """
    names = trainable_names(model)
    bias_name = head_bias_name(model, num_outputs)
    weight_name = bias_name[: -len("bias")] + "weight"
    bias = update[names.index(bias_name)].detach().double()
    weight = update[names.index(weight_name)].detach().double()
    k = int(bias.abs().argmax())
    return (weight[k] / bias[k]).float()
