"""Figure for docs/attacks.md: one attacked image per configuration, truth above reconstruction.

Reads the attack folders ``benchmarks/attack_bench.py`` wrote (``attack.json`` + ``grids/``)
and crops the first (ground truth | reconstruction) pair of each configuration's grid, so
the pixels are exactly those that were scored. Panels are labelled with the configuration
and its scores.

    python benchmarks/attack_figure.py /tmp/attack_bench/uniform/attack-none \\
        /tmp/attack_bench/uniform/attack-group --out docs/img/attack_grid.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def first_pair(grid_png: Path, side: int) -> tuple[np.ndarray, np.ndarray]:
    """The first (truth, reconstruction) pair of a ``privmed.attacks.grid`` PNG."""
    from PIL import Image

    from privmed.attacks.grid import GAP, MARGIN

    canvas = np.asarray(Image.open(grid_png).convert("L"))
    scale = max(1, -(-96 // side))
    t = side * scale
    truth = canvas[MARGIN : MARGIN + t, MARGIN : MARGIN + t]
    rec = canvas[MARGIN : MARGIN + t, MARGIN + t + GAP : MARGIN + 2 * t + GAP]
    return truth, rec


def label(record: dict, norm: str) -> str:
    s = record["summary"]
    what = f"batch {record['batch_size']}"
    what += f", DP sigma {record['dp_sigma']:g}" if record["dp_sigma"] else ", no DP"
    what += f", SecAgg {record['secagg_sites']} sites" if record["secagg_sites"] > 1 else ""
    return (
        f"{norm}: {what}\nSSIM {s['ssim']:.2f} (mean image {s['ssim_prior']:.2f})\n"
        f"residual corr. {s['residual_correlation']:.2f} (site mean {s['residual_correlation_site_mean']:.2f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("attack_dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for folder in args.attack_dirs:
        body = json.loads((folder / "attack.json").read_text())
        norm = {"group": "GroupNorm", "none": "no norm"}.get(body["plan"]["norm"], body["plan"]["norm"])
        side = int(body["plan"]["image_size"])
        for record in body["configurations"]:
            panels.append((first_pair(folder / record["grid"], side), label(record, norm)))
    columns = min(6, len(panels))
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(2 * rows, columns, figsize=(2.6 * columns, 5.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ((truth, rec), text) in enumerate(panels):
        r, c = divmod(i, columns)
        axes[2 * r, c].imshow(truth, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        axes[2 * r, c].set_title(text, fontsize=7.5)
        axes[2 * r + 1, c].imshow(rec, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    fig.text(0.005, 0.5, "top: attacked image, bottom: reconstruction from the update", rotation=90,
             va="center", fontsize=8)  # fmt: skip
    fig.tight_layout(rect=(0.015, 0, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
