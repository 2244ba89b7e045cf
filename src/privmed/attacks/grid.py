"""PNG grids of ground truth beside reconstruction, one pair per attacked image.

Pixels are written as they are (8-bit grey, first channel, nearest-neighbour upscaling), so
what the figure shows is what was scored: no contrast stretching, no smoothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from privmed.errors import InputError

GAP = 2  # pixels between the two images of a pair
MARGIN = 6  # pixels between pairs


def _to_uint8(image: np.ndarray, scale: int) -> np.ndarray:
    grey = np.clip(np.asarray(image, dtype=np.float64)[0], 0.0, 1.0)
    grey = np.kron(grey, np.ones((scale, scale)))
    return np.round(grey * 255.0).astype(np.uint8)


def pair_grid(
    truth: np.ndarray, reconstruction: np.ndarray, columns: int = 4, min_side: int = 96
) -> np.ndarray:
    """Tile ``(truth | reconstruction)`` pairs, ``columns`` pairs per row, as a uint8 array.

    ``truth`` and ``reconstruction`` are aligned ``(N, C, H, W)`` batches in ``[0, 1]``.
    Images are upscaled by an integer factor so that each side is at least ``min_side``.
    """
    if truth.shape != reconstruction.shape or truth.ndim != 4:
        raise InputError(
            f"grid: expected two (N, C, H, W) batches of one shape, got {truth.shape} and {reconstruction.shape}"
        )
    n, _, h, w = truth.shape
    scale = max(1, -(-min_side // max(h, w)))
    th, tw = h * scale, w * scale
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    pair_w = 2 * tw + GAP
    canvas = np.full(
        (rows * th + (rows + 1) * MARGIN, columns * pair_w + (columns + 1) * MARGIN), 255, dtype=np.uint8
    )
    for i in range(n):
        r, c = divmod(i, columns)
        top = MARGIN + r * (th + MARGIN)
        left = MARGIN + c * (pair_w + MARGIN)
        canvas[top : top + th, left : left + tw] = _to_uint8(truth[i], scale)
        canvas[top : top + th, left + tw + GAP : left + pair_w] = _to_uint8(reconstruction[i], scale)
    return canvas


def write_pair_grid(path: str | Path, truth: np.ndarray, reconstruction: np.ndarray, columns: int = 4) -> Path:
    """Write ``pair_grid`` as an 8-bit greyscale PNG and return its path."""
    from PIL import Image

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pair_grid(truth, reconstruction, columns), mode="L").save(out)
    return out
