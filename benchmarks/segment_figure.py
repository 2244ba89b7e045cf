"""Figure for docs/segment.md: CT slices with the secure tri-axial mask overlaid.

Reads the masks ``benchmarks/segment_bench.py`` saved (``segment_masks.npz``) and draws the
axial, coronal and sagittal slices through the largest lesion of the held-out 64^3 phantom
in the lung window, the secure mask as colour (lung blue, lesion red) and the phantom's true
lesion outline in yellow.

    python benchmarks/segment_figure.py [--masks benchmarks/results/segment/segment_masks.npz]
                                        [--out docs/img/segment_overlay.png] [--mode tri-axial]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--masks", type=Path, default=ROOT / "results" / "segment" / "segment_masks.npz")
    ap.add_argument("--out", type=Path, default=ROOT.parent / "docs" / "img" / "segment_overlay.png")
    ap.add_argument("--mode", default="tri-axial", choices=("2d", "tri-axial", "3d"))
    args = ap.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from scipy import ndimage

    data = np.load(args.masks)
    hu, truth, secure, plain = data["hu"], data["truth"], data[f"{args.mode}_secure"], data[f"{args.mode}_plain"]
    lesions, n = ndimage.label(truth == 2)
    if n:
        sizes = ndimage.sum(np.ones_like(lesions), lesions, range(1, n + 1))
        centre = [int(round(c)) for c in ndimage.center_of_mass(lesions == 1 + int(np.argmax(sizes)))]
    else:
        centre = [s // 2 for s in hu.shape]
    window = np.clip((hu + 1200.0) / 1600.0, 0, 1)  # lung window: centre -400, width 1600 HU
    colours = ListedColormap([(0, 0, 0, 0), (0.2, 0.5, 1.0, 0.35), (1.0, 0.1, 0.1, 0.6)])
    views = [("axial", lambda a: a[centre[0]]), ("coronal", lambda a: a[:, centre[1]]), ("sagittal", lambda a: a[:, :, centre[2]])]
    # drawn on the voxel grid (the phantom is defined on it; its voxels are 2.0 x 0.8 x 0.8 mm)
    aspects = {"axial": 1.0, "coronal": 1.0, "sagittal": 1.0}
    fig, axes = plt.subplots(1, 3, figsize=(11, 4.6))
    for ax, (name, cut) in zip(axes, views, strict=True):
        origin = "lower" if name != "axial" else "upper"  # superior up in coronal/sagittal
        ax.imshow(cut(window), cmap="gray", origin=origin, aspect=aspects[name], interpolation="nearest")
        ax.imshow(cut(secure), cmap=colours, vmin=0, vmax=2, origin=origin, aspect=aspects[name], interpolation="nearest")
        # contour in index coordinates, like imshow's pixels (its own `origin` would flip it again)
        ax.contour(cut(truth) == 2, levels=[0.5], colors="yellow", linewidths=1.0)
        ax.set_title(f"{name} slice {centre[['axial', 'coronal', 'sagittal'].index(name)]}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    differ = int((secure != plain).sum())
    fig.suptitle(
        f"privmed segment --mode {args.mode}: secure mask (lung blue, lesion red), true lesion outline yellow\n"
        f"held-out synthetic CT, 64^3 voxels; secure vs plaintext: {differ} of {secure.size} voxels differ",
        fontsize=10,
    )
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
