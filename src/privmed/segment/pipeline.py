"""Volume -> network inputs -> (engine) -> fused class probabilities -> label map.

``prepare`` and ``assemble`` are the whole pre- and post-processing; they run on the data
owner in clear and are identical for the secure and the plaintext engine, which only run the
network in between (``segment_volume`` wires the three together).

Modes (``model.MODES``):

- ``2d``: every axial slice ``volume[d]`` through ``Preprocess.apply`` (window, resize to the
  network's S x S, normalisation); the class probabilities of each slice are resized back to
  the slice (linear, pixel centres aligned) and stacked.
- ``tri-axial`` (2.5D): the axial, coronal and sagittal stacks (``views``) each go through
  the same 2-D network; the three probability volumes are averaged voxel by voxel, then the
  label is the argmax (for a one-channel Sigmoid model: probability > 0.5). By default
  (``view_slices="all"``) every one of the D + H + W slices runs, all in one session. With
  ``view_slices="grid"`` a stack with more slices than the network's side S is resampled
  along its slice axis to S slices first and its probabilities resampled back
  (``views.resample_axis``): min(D, S) + min(H, S) + min(W, S) network slices.
- ``3d``: the whole volume is windowed and normalised once (``Preprocess`` with no resize),
  optionally resampled to ``resample`` voxels, padded by edge replication to at least one
  patch, and cut into overlapping P^3 patches (``views.patch_boxes``); patch probabilities
  are blended (``views.blend``, Gaussian or constant weights), cropped and, if resampled,
  resized back to the input grid.

The label map has the input's shape and index order, so the input affine applies unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from privmed.engines import Engine, EngineRun, ModelCard
from privmed.errors import InputError
from privmed.segment import views
from privmed.segment.engines import auto_chunk, to_probabilities
from privmed.segment.model import MODES, SegmentationModel

log = logging.getLogger(__name__)

VIEWS_2D = {"2d": ("axial",), "tri-axial": ("axial", "coronal", "sagittal")}
VIEW_SLICES = ("grid", "all")


@dataclass
class Prepared:
    """Network inputs for one volume and what ``assemble`` needs to put outputs back.

    ``parts`` lists, in input order, ``(view, n_items, view_shape)`` for 2-D modes (the view's
    stack in the volume, ``(n_slices, rows, cols)``; n_items < n_slices when the stack was
    resampled to the network's grid), or one ``("patches", n, patch)`` entry for 3-D. ``boxes`` are the 3-D windows in the padded
    (and resampled) grid ``grid``; ``crop`` removes the padding.
    """

    mode: str
    inputs: np.ndarray
    shape: tuple[int, int, int]
    parts: list[tuple[str, int, tuple[int, ...]]]
    unit: str
    boxes: list[tuple[slice, ...]] = field(default_factory=list)
    grid: tuple[int, ...] = ()
    crop: tuple[slice, ...] = ()
    resampled: tuple[int, int, int] | None = None


@dataclass
class Segmentation:
    """A segmented volume: labels, fused probabilities, the engine run and timings."""

    labels: np.ndarray  # uint8 (D, H, W)
    probabilities: np.ndarray  # float32 (K', D, H, W)
    prepared: Prepared
    run: EngineRun
    seconds: dict[str, float]

    @property
    def n_items(self) -> int:
        return int(len(self.prepared.inputs))


def _check_volume(volume: np.ndarray) -> tuple[int, int, int]:
    if volume.ndim != 3:
        raise InputError(f"expected a volume (D, H, W), got shape {volume.shape}")
    return (int(volume.shape[0]), int(volume.shape[1]), int(volume.shape[2]))


def prepare(
    volume: np.ndarray,
    model: SegmentationModel,
    mode: str,
    *,
    overlap: float = 0.25,
    resample: tuple[int, int, int] | None = None,
    view_slices: str = "all",
) -> Prepared:
    """Network inputs ``(N, C, *model.side)`` float32 for ``volume`` in ``mode``.

    ``view_slices`` (tri-axial only): "all" keeps every slice, "grid" resamples a stack longer
    than the network's side to that many slices (module docstring)."""
    from privmed.data.preprocess import resize

    shape = _check_volume(volume)
    if mode not in MODES:
        raise InputError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
    model.check_mode(mode)
    pre = model.preprocess
    if mode in VIEWS_2D:
        if resample is not None:
            raise InputError("--resample applies to --mode 3d only")
        if view_slices not in VIEW_SLICES:
            raise InputError(f"view slices {view_slices!r}: expected one of {', '.join(VIEW_SLICES)}")
        items: list[np.ndarray] = []
        parts: list[tuple[str, int, tuple[int, ...]]] = []
        for view in VIEWS_2D[mode]:
            slices = views.stack(volume, view)
            side = int(max(model.side))
            if mode == "tri-axial" and view_slices == "grid" and len(slices) > side:
                taken = views.resample_axis(slices, side)
            else:
                taken = slices
            items.extend(pre.apply(s) for s in taken)
            parts.append((view, len(taken), tuple(slices.shape)))
        return Prepared(mode, np.stack(items).astype(np.float32), shape, parts, "slice")
    whole = replace(pre, size=None).apply(volume)  # (C, D, H, W): window + normalisation only
    if resample is not None:
        if len(resample) != 3 or min(resample) < 1:
            raise InputError(f"--resample {resample}: expected three positive sizes D,H,W")
        whole = np.stack([resize(ch, resample) for ch in whole]).astype(np.float32)
    padded, crop = views.pad_to(whole, model.side)
    boxes = views.patch_boxes(padded.shape[1:], model.side, overlap)
    inputs = np.stack([padded[(slice(None), *box)] for box in boxes]).astype(np.float32)
    return Prepared(
        mode, inputs, shape, [("patches", len(boxes), tuple(model.side))], "patch",
        boxes=boxes, grid=tuple(padded.shape[1:]), crop=crop,
        resampled=tuple(resample) if resample is not None else None,  # type: ignore[arg-type]
    )  # fmt: skip


def assemble(prepared: Prepared, probabilities: np.ndarray, *, blend: str = "gaussian") -> np.ndarray:
    """Class probabilities ``(K', D, H, W)`` float32 of the volume from per-item probabilities."""
    from privmed.data.preprocess import resize

    if len(probabilities) != len(prepared.inputs):
        raise InputError(f"got {len(probabilities)} outputs for {len(prepared.inputs)} inputs")
    k = probabilities.shape[1]
    if prepared.mode in VIEWS_2D:
        total = np.zeros((k, *prepared.shape), dtype=np.float64)
        start = 0
        for view, n, view_shape in prepared.parts:
            part = np.moveaxis(probabilities[start : start + n], 1, 0)  # (K, n, S, S)
            start += n
            if part.shape[1:] != view_shape:  # in plane, and along the slice axis if resampled
                part = np.stack([resize(c, view_shape) for c in part])
            views.put_stack(total, part, view)
        return (total / len(prepared.parts)).astype(np.float32)
    weight = views.blend_weights(probabilities.shape[2:], blend)
    fused = views.blend(probabilities, prepared.boxes, prepared.grid, weight)[prepared.crop]
    if prepared.resampled is not None:
        fused = np.stack([resize(c, prepared.shape) for c in fused])
    return fused.astype(np.float32)


def labels_from(probabilities: np.ndarray) -> np.ndarray:
    """Argmax over classes (ties go to the lower label, so p = 0.5 stays background)."""
    return np.argmax(probabilities, axis=0).astype(np.uint8)


def segment_volume(
    volume: np.ndarray,
    model: SegmentationModel,
    engine: Engine,
    mode: str,
    *,
    overlap: float = 0.25,
    blend: str = "gaussian",
    resample: tuple[int, int, int] | None = None,
    view_slices: str = "all",
) -> Segmentation:
    """Segment ``volume`` ``(D, H, W)`` (modality units) with ``model`` run by ``engine``."""
    views.blend_weights((1,), blend)  # reject a bad --blend before any work
    seconds: dict[str, Any] = {}
    t0 = time.perf_counter()
    prepared = prepare(volume, model, mode, overlap=overlap, resample=resample, view_slices=view_slices)
    seconds["prepare_s"] = time.perf_counter() - t0
    log.info("%s: %d %ss of %s", mode, len(prepared.inputs), prepared.unit, model.side)
    t1 = time.perf_counter()
    card = model.card or ModelCard.read(model.path, model.input_shape)
    run = engine.run(card, prepared.inputs, default_chunk=auto_chunk(model, len(prepared.inputs)))
    seconds["engine_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    expected = (len(prepared.inputs), model.num_outputs, *model.side)
    if tuple(run.outputs.shape) != expected:
        raise InputError(f"{model.path}: engine returned outputs {tuple(run.outputs.shape)}, expected {expected}")
    probabilities = assemble(prepared, to_probabilities(run.outputs, model.final), blend=blend)
    labels = labels_from(probabilities)
    seconds["assemble_s"] = time.perf_counter() - t2
    return Segmentation(labels, probabilities, prepared, run, {k: round(v, 3) for k, v in seconds.items()})
