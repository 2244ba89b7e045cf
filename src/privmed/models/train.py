"""Train a zoo model on a study and leave it as ONNX + preprocessing + metrics (plaintext, CPU).

``train_classifier``: multi-label findings (masked BCE), AUROC per finding.
``train_segmenter``: U-Net on NIfTI image/label pairs (Dice + cross-entropy), Dice per class.

Both split the data the same way (``arrays.split_rows``): ``val_site`` is a held-out
institution that is only scored at the end, on the exported ONNX run by onnxruntime;
early stopping and the per-epoch validation line use a "tune" split drawn from the other
sites. Outputs in ``out_dir`` (``<name>`` defaults to the model name)::

    <name>.onnx             opset 17, batch 1, final Sigmoid (classifier) / Softmax (segmenter)
    <name>.preprocess.json  privmed.data.preprocess.Preprocess of the model input
    <name>.metrics.json     settings, splits, per-epoch history, tune and held-out scores

Weight initialisation, the split, shuffling and augmentation derive from ``seed`` only.
Threads are left to the caller (``torch.set_num_threads``): libraries do not set globals.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from privmed.errors import InputError
from privmed.models.arrays import (
    ArraySet,
    classification_arrays,
    segmentation_arrays,
    split_rows,
)
from privmed.models.export import export_onnx, op_counts
from privmed.models.loop import EpochReport, fit
from privmed.models.objectives import (
    auroc_per_finding,
    dice_per_class,
    intensity_augment,
    masked_bce,
    nanmean,
)
from privmed.models.zoo import build_model

if TYPE_CHECKING:
    from privmed.data.datasets import Study

log = logging.getLogger(__name__)

CLASSIFIERS = ("small-cnn", "resnet18", "densenet121")
SEGMENTERS = ("unet2d", "unet3d")
CT_WINDOW = (-400.0, 1600.0)  # lung window, HU: keeps lung, ground glass and soft tissue apart


@dataclass(frozen=True)
class TrainResult:
    """Paths of the written artefacts and the metrics dictionary saved with them."""

    onnx_path: Path
    preprocess_path: Path
    metrics_path: Path
    metrics: dict[str, Any]


def _load(study: Study | str | Path) -> Study:
    from privmed.data.datasets import load_study

    return study if hasattr(study, "records") else load_study(study)  # type: ignore[return-value]


def _predict(model: nn.Module, x: np.ndarray, batch: int = 64) -> np.ndarray:
    with torch.no_grad():
        outs = [model(torch.from_numpy(x[i : i + batch])) for i in range(0, len(x), batch)]
    return torch.cat(outs).numpy()


def _onnx_predict(path: Path, x: np.ndarray) -> np.ndarray:
    """Run the exported model one image at a time (its batch is fixed to 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])


def _build(name: str, in_channels: int, outputs: int, norm: str, dims: int, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the global RNG
        torch.manual_seed(seed)
        return build_model(name, in_channels, outputs, spatial_dims=dims, norm=norm)


def _split(data: ArraySet, val_site: str | None, seed: int) -> tuple[ArraySet, ArraySet, ArraySet]:
    rng = np.random.default_rng([seed, 1])
    train, tune, test = split_rows(data.sites, data.group or data.image_ids, val_site, rng)
    return data.take(train), data.take(tune), data.take(test)


def _file_info(path: Path) -> dict[str, Any]:
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "ops": op_counts(path),
    }


def _json_safe(value: Any) -> Any:
    """Replace nan/inf floats (not valid JSON) by None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _write_metrics(out_dir: Path, name: str, metrics: dict[str, Any]) -> Path:
    path = out_dir / f"{name}.metrics.json"
    text = json.dumps(_json_safe(metrics), indent=2, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path


def _best_tune(reports: list[EpochReport], best_epoch: int) -> dict[str, float]:
    """Tune metrics of the kept epoch ({} if no epoch had a defined score)."""
    return dict(reports[best_epoch - 1].val_metrics) if best_epoch > 0 else {}


def _common_metrics(model_name: str, model: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    import monai
    import onnx

    return {
        "model": model_name,
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "settings": settings,
        "versions": {
            "torch": torch.__version__,
            "monai": monai.__version__,
            "onnx": onnx.__version__,
        },
    }


def _history(reports: list[EpochReport]) -> list[dict[str, Any]]:
    return [
        {"epoch": r.epoch, "train_loss": round(r.train_loss, 5), "tune_loss": round(r.val_loss, 5),
         "tune": {k: round(v, 4) for k, v in r.val_metrics.items()},
         "seconds": round(r.seconds, 2)}
        for r in reports
    ]  # fmt: skip


def train_classifier(
    study: Study | str | Path,
    model_name: str,
    out_dir: str | Path,
    *,
    epochs: int = 30,
    batch_size: int = 32,
    lr: float = 3e-3,
    seed: int = 0,
    val_site: str | None = None,
    size: int = 64,
    norm: str = "batch",
    patience: int = 6,
    augment: bool = True,
    name: str | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train a multi-label classifier; export ONNX (+ Sigmoid), preprocess json, metrics.json.

    Parameters
    ----------
    study : a ``Study`` or a folder/file ``load_study`` accepts (images with finding labels).
    model_name : "small-cnn", "resnet18" or "densenet121".
    out_dir : folder for ``<name>.onnx``, ``<name>.preprocess.json``, ``<name>.metrics.json``.
    epochs, batch_size, lr, patience : optimisation (AdamW, cosine decay, early stopping on
        the tune split's mean AUROC).
    seed : seeds initialisation, split, shuffling and augmentation.
    val_site : site held out entirely and scored at the end (None: no held-out score).
    size : images are resized to ``size`` x ``size`` and z-scored per image.
    norm : "batch", "group" (DP) or "none"; see ``privmed.models.zoo``.
    augment : random gamma/noise per image (``objectives.intensity_augment``).
    command : the command line that ran this, recorded in the metrics.
    """
    from privmed.data.preprocess import Preprocess

    if model_name not in CLASSIFIERS:
        raise InputError(f"classifier {model_name!r}: expected one of {', '.join(CLASSIFIERS)}")
    started = time.perf_counter()
    out = Path(out_dir)
    name = name or model_name
    data_study = _load(study)
    findings = list(data_study.findings)
    if not findings:
        raise InputError(f"{data_study.root}: the study has no finding labels to train on")
    pre = Preprocess(size=(size, size), channels=1, normalize="zscore", window="file")
    data = classification_arrays(data_study, pre)
    train, tune, test = _split(data, val_site, seed)
    model = _build(model_name, 1, len(findings), norm, 2, seed)
    gen = torch.Generator().manual_seed(seed)
    tune_x, tune_y = tune.x, tune.y

    def validate(m: nn.Module) -> tuple[float, dict[str, float], float]:
        logits = _predict(m, tune_x)
        loss = float(masked_bce(torch.from_numpy(logits), torch.from_numpy(tune_y)))
        aurocs = auroc_per_finding(logits, tune_y, findings)
        return loss, aurocs, nanmean(aurocs)

    result = fit(
        model, masked_bce, torch.from_numpy(train.x), torch.from_numpy(train.y), validate,
        epochs=epochs, batch_size=batch_size, lr=lr, generator=gen, patience=patience,
        augment=intensity_augment if augment else None, on_batch=on_batch, on_epoch=on_epoch,
    )  # fmt: skip

    served = nn.Sequential(model, nn.Sigmoid()).eval()
    onnx_path = export_onnx(
        served, (1, 1, size, size), out / f"{name}.onnx", pre,
        metadata={"privmed.task": "multilabel-classification", "privmed.output": "probabilities",
                  "privmed.labels": json.dumps(findings)},
    )  # fmt: skip
    metrics = _common_metrics(model_name, model, {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "size": size,
        "norm": norm, "patience": patience, "augment": augment, "val_site": val_site,
    })  # fmt: skip
    metrics.update({
        "task": "multilabel-classification", "command": command, "findings": findings,
        "input_shape": [1, 1, size, size], "onnx": _file_info(onnx_path),
        "split": {"train": _site_counts(train), "tune": _site_counts(tune),
                  "test": _site_counts(test), "skipped": len(data.skipped)},
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "tune": {"auroc": _best_tune(result.history, result.best_epoch),
                 "mean_auroc": result.best_score},
        "history": _history(result.history),
    })  # fmt: skip
    if len(test):
        probs = _onnx_predict(onnx_path, test.x)
        torch_probs = _predict(served, test.x)
        aurocs = auroc_per_finding(probs, test.y, findings)
        metrics["held_out"] = {
            "site": val_site, "n": len(test), "auroc": aurocs, "mean_auroc": nanmean(aurocs),
            "prevalence": {f: round(float(np.nanmean(test.y[:, k])), 4) for k, f in enumerate(findings)},
            "scored_with": "onnxruntime on the exported model",
            "max_abs_diff_onnx_vs_torch": float(np.abs(probs - torch_probs).max()),
        }  # fmt: skip
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics_path = _write_metrics(out, name, metrics)
    return TrainResult(onnx_path, out / f"{name}.preprocess.json", metrics_path, metrics)


def _site_counts(part: ArraySet) -> dict[str, int]:
    counts: dict[str, int] = {}
    for site in part.sites:
        counts[site] = counts.get(site, 0) + 1
    return counts


def train_segmenter(
    study: Study | str | Path,
    model_name: str,
    out_dir: str | Path,
    *,
    epochs: int = 30,
    batch_size: int = 16,
    lr: float = 3e-3,
    seed: int = 0,
    val_site: str | None = None,
    size: int = 64,
    norm: str = "batch",
    patience: int = 6,
    window: tuple[float, float] = CT_WINDOW,
    name: str | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
    on_epoch: Callable[[EpochReport], None] | None = None,
    command: str | None = None,
) -> TrainResult:
    """Train a U-Net on NIfTI image/label pairs; export ONNX (+ Softmax), preprocess, metrics.

    "unet2d" trains on every axial slice (first array axis) resized to ``size`` x ``size``;
    "unet3d" on whole volumes resized to ``size``^3. Intensities are windowed (``window``,
    HU centre/width) to [0, 1] and standardised with the fixed mean 0.5 / std 0.25.
    The loss is MONAI's DiceCELoss (softmax, one-hot targets); early stopping uses the mean
    per-volume Dice of the foreground classes on the tune split. Other parameters as in
    ``train_classifier``.
    """
    from monai.losses import DiceCELoss

    from privmed.data.preprocess import Preprocess

    if model_name not in SEGMENTERS:
        raise InputError(f"segmenter {model_name!r}: expected one of {', '.join(SEGMENTERS)}")
    if size % 16:
        raise InputError(f"--size {size}: the U-Nets need a multiple of 16")
    started = time.perf_counter()
    out = Path(out_dir)
    name = name or model_name
    data_study = _load(study)
    classes = list(data_study.findings)
    if not classes or not any(r.mask_path for r in data_study.records):
        raise InputError(f"{data_study.root}: expected NIfTI image/label pairs with named labels")
    dims = 2 if model_name == "unet2d" else 3
    pre = Preprocess(size=(size,) * dims, channels=1, normalize="fixed", mean=0.5, std=0.25,
                     window=window)  # fmt: skip
    data = segmentation_arrays(data_study, pre, slices=dims == 2, num_classes=len(classes) + 1)
    train, tune, test = _split(data, val_site, seed)
    model = _build(model_name, 1, len(classes) + 1, norm, dims, seed)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return dice_ce(logits, target.unsqueeze(1))

    def validate(m: nn.Module) -> tuple[float, dict[str, float], float]:
        logits = torch.from_numpy(_predict(m, tune.x, batch=16))
        loss = float(loss_fn(logits, torch.from_numpy(tune.y)))
        dice = dice_per_class(logits.argmax(1).numpy(), tune.y, tune.group, classes)
        return loss, dice, nanmean(dice)

    result = fit(
        model, loss_fn, torch.from_numpy(train.x), torch.from_numpy(train.y), validate,
        epochs=epochs, batch_size=batch_size, lr=lr, generator=torch.Generator().manual_seed(seed),
        patience=patience, on_batch=on_batch, on_epoch=on_epoch,
    )  # fmt: skip
    served = nn.Sequential(model, nn.Softmax(dim=1)).eval()
    onnx_path = export_onnx(
        served, (1, 1) + (size,) * dims, out / f"{name}.onnx", pre,
        metadata={"privmed.task": "segmentation", "privmed.output": "probabilities",
                  "privmed.labels": json.dumps(["background", *classes])},
    )  # fmt: skip
    metrics = _common_metrics(model_name, model, {
        "epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "size": size,
        "norm": norm, "patience": patience, "window": list(window), "val_site": val_site,
    })  # fmt: skip
    metrics.update({
        "task": "segmentation", "command": command, "classes": ["background", *classes],
        "input_shape": [1, 1] + [size] * dims, "onnx": _file_info(onnx_path),
        "split": {"train": _site_counts(train), "tune": _site_counts(tune),
                  "test": _site_counts(test), "skipped": len(data.skipped)},
        "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "tune": {"dice": _best_tune(result.history, result.best_epoch),
                 "mean_dice": result.best_score},
        "history": _history(result.history),
    })  # fmt: skip
    if len(test):
        probs = _onnx_predict(onnx_path, test.x)
        dice = dice_per_class(probs.argmax(1), test.y, test.group, classes)
        metrics["held_out"] = {
            "site": val_site, "volumes": len(set(test.group)), "dice": dice,
            "mean_dice": nanmean(dice), "scored_with": "onnxruntime on the exported model",
        }  # fmt: skip
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    metrics_path = _write_metrics(out, name, metrics)
    return TrainResult(onnx_path, out / f"{name}.preprocess.json", metrics_path, metrics)


def is_segmenter(model_name: str) -> bool:
    """True for the U-Nets (trained by ``train_segmenter``)."""
    return model_name in SEGMENTERS
