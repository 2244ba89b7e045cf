"""Pure geometry: slice stacks (2D / tri-axial) and sliding-window patches with blending (3D).

Axes follow the data layer: a volume is ``(D, H, W)`` with D the axial slice index. The
three stacks of the 2.5D method are

- axial:    ``volume[d, :, :]``  (D slices of H x W),
- coronal:  ``volume[:, h, :]``  (H slices of D x W),
- sagittal: ``volume[:, :, w]``  (W slices of D x H).

Slices at the network's grid (tri-axial, ``--view-slices grid``; the default runs every slice): a stack with more slices than the network's
side S is first resampled along its slice axis to S slices (``resample_axis``, in the
modality's units, as a thicker reconstruction would average them), so that each
view is sampled along its slice axis no finer than the network sees it in plane. A 512 x 512 x
300 CT through a 256 x 256 network then needs 256 + 256 + 256 network slices, not 300 + 512 +
512; the coronal and sagittal stacks were 2x finer along their slice axis than in plane, which
the network's in-plane resize throws away anyway. The probabilities come back to every slice by
the same linear interpolation that brings them back in plane.

Sliding windows (3D): along an axis of length L >= P (patch side P), window starts are
``0, s, 2s, ...`` with stride ``s = max(1, floor(P * (1 - overlap)))`` and a last window
flush with the end (``L - P``), so every voxel is covered and no window leaves the volume.
A volume side shorter than P is padded first (``pad_to``). Overlapping predictions are
blended as a weighted mean: ``sum_k w_k p_k / sum_k w_k`` with per-patch weights ``w``:

- ``"gaussian"`` (default): ``w(x) = exp(-|x - c|^2 / (2 sigma^2))`` with centre c = (P-1)/2
  and sigma = P/8 per axis (the choice of nnU-Net and MONAI's sliding_window_inference),
  floored at 1e-3 of its maximum so that corner voxels covered by one patch only keep a
  well-defined weight. Border voxels of a patch see less context, so they count less.
- ``"constant"``: w = 1, the plain mean of the overlapping predictions.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from privmed.errors import InputError

AXES = {"axial": 0, "coronal": 1, "sagittal": 2}
BLENDS = ("gaussian", "constant")
GAUSSIAN_SIGMA_FRACTION = 1.0 / 8.0
GAUSSIAN_FLOOR = 1e-3


def stack(volume: np.ndarray, view: str) -> np.ndarray:
    """The slices of ``view`` as an array ``(n_slices, rows, cols)`` (a view, no copy)."""
    axis = AXES[view]
    return np.moveaxis(volume, axis, 0)


def resample_axis(stack_: np.ndarray, n_out: int) -> np.ndarray:
    """``stack_`` ``(n, rows, cols)`` resampled to ``(n_out, rows, cols)`` float32 along axis 0.

    The same map as ``privmed.data.preprocess.resize`` on that one axis (output slice j samples
    the input at (j + 0.5) * n / n_out - 0.5, linear, edges replicated; a shrinking axis is first
    smoothed with a Gaussian of sigma (f - 1) / 2, f = n / n_out), without the full-volume
    coordinate grids ``resize`` builds: two float32 copies of the stack at most.
    """
    from scipy import ndimage

    n = int(stack_.shape[0])
    if n_out < 1:
        raise InputError(f"resample_axis: expected a positive slice count, got {n_out}")
    src = np.asarray(stack_, dtype=np.float32)
    if n_out == n:
        return src
    factor = n / n_out
    if factor > 1.0:
        src = ndimage.gaussian_filter1d(src, (factor - 1.0) / 2.0, axis=0, mode="nearest")
    pos = np.clip((np.arange(n_out) + 0.5) * factor - 0.5, 0.0, n - 1.0)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, n - 1)
    w = (pos - lo).astype(np.float32)[:, None, None]
    return (1.0 - w) * src[lo] + w * src[hi]


def put_stack(target: np.ndarray, slices: np.ndarray, view: str) -> None:
    """Add ``slices`` ``(K, n, rows, cols)`` (per-class slice stack of ``view``) into ``target`` ``(K, D, H, W)``."""
    axis = AXES[view]
    np.moveaxis(target, axis + 1, 1)[...] += slices


def window_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of side ``patch`` covering ``[0, length)``; pre: length >= patch."""
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"--overlap {overlap}: expected a fraction in [0, 1)")
    if patch < 1 or length < patch:
        raise InputError(f"window: expected 1 <= patch <= length, got patch {patch}, length {length}")
    stride = max(1, int(np.floor(patch * (1.0 - overlap))))
    starts = list(range(0, length - patch, stride))
    starts.append(length - patch)
    return starts


def patch_boxes(shape: Sequence[int], patch: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """Every window (as a tuple of slices) of a ``shape`` volume, C order over the start grid."""
    per_axis = [window_starts(int(n), int(p), overlap) for n, p in zip(shape, patch, strict=True)]
    return [
        tuple(slice(s, s + int(p)) for s, p in zip(starts, patch, strict=True))
        for starts in itertools.product(*per_axis)
    ]


def blend_weights(patch: Sequence[int], kind: str = "gaussian") -> np.ndarray:
    """Per-voxel weight of one patch's prediction (float64, max 1); see the module docstring."""
    if kind not in BLENDS:
        raise InputError(f"--blend {kind!r}: expected one of {', '.join(BLENDS)}")
    shape = tuple(int(p) for p in patch)
    if kind == "constant":
        return np.ones(shape)
    weight = np.ones(shape)
    for axis, p in enumerate(shape):
        x = np.arange(p) - (p - 1) / 2.0
        g = np.exp(-(x**2) / (2.0 * (GAUSSIAN_SIGMA_FRACTION * p) ** 2))
        weight = weight * g.reshape([-1 if a == axis else 1 for a in range(len(shape))])
    weight /= weight.max()
    return np.maximum(weight, GAUSSIAN_FLOOR)


def pad_to(volume: np.ndarray, minimum: Sequence[int]) -> tuple[np.ndarray, tuple[slice, ...]]:
    """Pad the trailing spatial axes of ``volume`` (``(C, *spatial)``) up to ``minimum`` by edge replication.

    Returns the padded array and the slices that crop it back. Edge replication (not zeros)
    because zero is a meaningful intensity after normalisation (mid-window for CT).
    """
    spatial = volume.shape[1:]
    extra = [max(0, int(m) - int(n)) for n, m in zip(spatial, minimum, strict=True)]
    crop = (slice(None),) + tuple(slice(0, int(n)) for n in spatial)
    if not any(extra):
        return volume, crop
    padded = np.pad(volume, [(0, 0)] + [(0, e) for e in extra], mode="edge")
    return padded, crop


def blend(
    predictions: np.ndarray,
    boxes: Sequence[tuple[slice, ...]],
    shape: Sequence[int],
    weight: np.ndarray,
) -> np.ndarray:
    """Weighted mean of patch ``predictions`` ``(N, K, *patch)`` placed at ``boxes`` in ``(K, *shape)``."""
    if len(predictions) != len(boxes):
        raise InputError(f"blend: {len(predictions)} predictions for {len(boxes)} windows")
    k = predictions.shape[1]
    total = np.zeros((k, *shape), dtype=np.float64)
    norm = np.zeros(tuple(shape), dtype=np.float64)
    for pred, box in zip(predictions, boxes, strict=True):
        total[(slice(None), *box)] += weight * pred
        norm[box] += weight
    return total / norm
