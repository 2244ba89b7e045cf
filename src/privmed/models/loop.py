"""The epoch loop shared by classifier and segmenter training.

``fit`` runs mini-batch training with AdamW and a cosine learning-rate decay, evaluates a
validation score after every epoch, keeps the weights of the best epoch and stops early
when the score has not improved for ``patience`` epochs. It reports through callbacks
(``on_batch``, ``on_epoch``) and never prints: the CLI turns the callbacks into progress
bars. All randomness (shuffling, augmentation) comes from one seeded ``torch.Generator``.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

# (model, validation inputs) -> (validation loss, {metric name: value}, score to maximise)
Validator = Callable[[nn.Module], tuple[float, dict[str, float], float]]
# (batch x, batch y, generator) -> augmented (x, y)
Augmenter = Callable[
    [torch.Tensor, torch.Tensor, torch.Generator], tuple[torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class EpochReport:
    """What one epoch did; ``best`` marks the epoch whose weights are kept so far."""

    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_metrics: dict[str, float]
    val_score: float
    seconds: float
    best: bool


@dataclass
class FitResult:
    """Best weights (already loaded into the model), its epoch and every epoch's report."""

    best_epoch: int
    best_score: float
    history: list[EpochReport] = field(default_factory=list)
    stopped_early: bool = False


def fit(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    validate: Validator,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    weight_decay: float = 1e-4,
    patience: int = 5,
    augment: Augmenter | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``(train_x, train_y)``; leave it holding the best weights.

    Parameters
    ----------
    loss_fn : ``loss_fn(model(x), y)`` -> scalar tensor.
    validate : called after each epoch with the model in eval mode; returns
        ``(val_loss, metrics, score)``; a higher ``score`` is better. A NaN score never
        counts as an improvement.
    epochs, batch_size, lr, weight_decay : AdamW settings; the learning rate follows a
        cosine from ``lr`` to ``lr / 20`` over ``epochs``.
    generator : seeds shuffling and ``augment``.
    patience : stop after this many epochs without a better score (0 disables).
    on_batch : ``on_batch(done, total, running_loss)`` after each mini-batch.
    on_epoch : called with each ``EpochReport``.
    """
    n = int(train_x.shape[0])
    if n == 0:
        raise ValueError("fit: empty training set")
    batches = math.ceil(n / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs * batches), eta_min=lr / 20
    )
    result = FitResult(best_epoch=0, best_score=-math.inf)
    best_state = copy.deepcopy(model.state_dict())
    since_best = 0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        model.train()
        order = torch.randperm(n, generator=generator)
        total_loss = 0.0
        for b in range(batches):
            index = order[b * batch_size : (b + 1) * batch_size]
            if index.numel() < 2 and b > 0:
                continue  # a batch of one breaks BatchNorm; drop the ragged tail
            x, y = train_x[index], train_y[index]
            if augment is not None:
                x, y = augment(x, y, generator)
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += float(loss.detach()) * index.numel()
            if on_batch is not None:
                on_batch(b + 1, batches, total_loss / min(n, (b + 1) * batch_size))
        model.eval()
        with torch.no_grad():
            val_loss, metrics, score = validate(model)
        improved = not math.isnan(score) and score > result.best_score
        if improved:
            result.best_epoch, result.best_score = epoch, score
            best_state = copy.deepcopy(model.state_dict())
            since_best = 0
        else:
            since_best += 1
        report = EpochReport(
            epoch=epoch,
            epochs=epochs,
            train_loss=total_loss / n,
            val_loss=val_loss,
            val_metrics=metrics,
            val_score=score,
            seconds=time.perf_counter() - start,
            best=improved,
        )
        result.history.append(report)
        log.debug("epoch %d/%d loss %.4f score %.4f", epoch, epochs, report.train_loss, score)
        if on_epoch is not None:
            on_epoch(report)
        if patience and since_best >= patience:
            result.stopped_early = epoch < epochs
            break
    model.load_state_dict(best_state)
    model.eval()
    return result
