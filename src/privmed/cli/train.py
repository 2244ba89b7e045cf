"""`privmed train`: train a zoo model on a study, export ONNX + preprocessing + metrics.

Argument parsing and progress display only; the work is ``privmed.models.train``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any, TextIO

MODEL_CHOICES = ("small-cnn", "resnet18", "densenet121", "unet2d", "unet3d")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a classifier or U-Net on a study; export ONNX",
        description=(
            "Train a model from the privmed zoo on CPU and write <name>.onnx, "
            "<name>.preprocess.json and <name>.metrics.json to --out. Classifiers "
            "(small-cnn, resnet18, densenet121) train on labelled images (ChestX-ray14/"
            "CheXpert CSV, MedMNIST, class folders); U-Nets (unet2d, unet3d) on NIfTI "
            "image/label pairs. --val-site holds one site out and scores it at the end."
        ),
    )
    parser.add_argument("--data", required=True, help="study folder or file (see privmed data)")
    parser.add_argument("--model", required=True, choices=MODEL_CHOICES)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--name", default=None, help="file stem of the outputs (default: model)")
    parser.add_argument("--epochs", type=int, default=30, help="maximum epochs (default 30)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 32 (classifiers) or 16 (U-Nets)")  # fmt: skip
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (3e-3)")
    parser.add_argument("--patience", type=int, default=6,
                        help="stop after this many epochs without improvement (0: never)")  # fmt: skip
    parser.add_argument("--val-site", default=None, help="site to hold out and score at the end")
    parser.add_argument("--size", type=int, default=64, help="input side in pixels (64)")
    parser.add_argument("--norm", default="batch", choices=("batch", "group", "none"))
    parser.add_argument("--no-augment", action="store_true",
                        help="classifiers: no random gamma/noise augmentation")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the machine may be shared; 0 = all)")  # fmt: skip
    parser.set_defaults(func=run)


class Progress:
    """A batch bar redrawn in place on a terminal (``bar``) and one line per epoch (``out``)."""

    def __init__(self, bar: TextIO, out: TextIO) -> None:
        self.stream = bar
        self.out = out
        self.live = bar.isatty()
        self.epoch = 1

    def batch(self, done: int, total: int, loss: float) -> None:
        if not self.live:
            return
        width = 24
        filled = round(width * done / total)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(f"\r  epoch {self.epoch:3d} [{bar}] {done}/{total} loss {loss:.4f}")
        self.stream.flush()

    def epoch_done(self, report: Any) -> None:
        if self.live:
            self.stream.write("\r" + " " * 72 + "\r")
            self.stream.flush()
        scores = "  ".join(f"{k} {v:.3f}" for k, v in report.val_metrics.items())
        mark = "  *" if report.best else ""
        self.out.write(
            f"epoch {report.epoch:3d}/{report.epochs}  loss {report.train_loss:.4f}  "
            f"tune loss {report.val_loss:.4f}  {scores}  mean {report.val_score:.3f}  "
            f"({report.seconds:.1f} s){mark}\n"
        )
        self.out.flush()
        self.epoch = report.epoch + 1


def run(args: argparse.Namespace) -> int:
    import torch

    from privmed.models import train as training

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    progress = Progress(sys.stderr, sys.stdout)
    command = "privmed " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else None
    common = dict(
        epochs=args.epochs, lr=args.lr, seed=args.seed, val_site=args.val_site, size=args.size,
        norm=args.norm, patience=args.patience, name=args.name, on_batch=progress.batch,
        on_epoch=progress.epoch_done, command=command,
    )  # fmt: skip
    if training.is_segmenter(args.model):
        result = training.train_segmenter(
            args.data, args.model, args.out, batch_size=args.batch_size or 16, **common
        )
        score_key, mean_key = "dice", "mean_dice"
    else:
        result = training.train_classifier(
            args.data, args.model, args.out, batch_size=args.batch_size or 32,
            augment=not args.no_augment, **common,
        )  # fmt: skip
        score_key, mean_key = "auroc", "mean_auroc"
    _summary(result, score_key, mean_key)
    return 0


def _summary(result: Any, score_key: str, mean_key: str) -> None:
    m = result.metrics
    split = m["split"]
    print(
        f"best epoch {m['best_epoch']} of {m['epochs_run']}"
        f"{' (stopped early)' if m['stopped_early'] else ''}; "
        f"train {sum(split['train'].values())}, tune {sum(split['tune'].values())}, "
        f"held out {sum(split['test'].values())}; {m['seconds']} s"
    )
    print(f"tune {mean_key} {_fmt(m['tune'][mean_key])}")
    held = m.get("held_out")
    if held:
        print(f"held-out site {held['site']} ({score_key} from onnxruntime on the exported model):")
        for key, value in held[score_key].items():
            print(f"  {key:14s} {_fmt(value)}")
        print(f"  {'mean':14s} {_fmt(held[mean_key])}")
    onnx = m["onnx"]
    ops = ", ".join(f"{op} {n}" for op, n in onnx["ops"].items())
    print(f"wrote {result.onnx_path} ({onnx['bytes']} bytes; {ops})")
    print(f"wrote {result.preprocess_path}")
    print(f"wrote {result.metrics_path}")


def _fmt(value: float | None) -> str:
    import math

    return (
        "n/a"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else f"{value:.3f}"
    )
