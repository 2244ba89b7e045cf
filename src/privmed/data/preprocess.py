"""One preprocessing description, stored next to each model, used by every inference path.

A model trained by privmed is saved with ``<model>.preprocess.json`` (see ``sidecar_path``).
The data owner turns any supported file into the model's input with
``load_for_model(path, Preprocess.load(sidecar))``, whether the model then runs in plaintext
or under MPC, so both paths see exactly the same numbers.

Steps of ``Preprocess.apply`` (in this order):

1. layout: ``(H, W)``, ``(H, W, 3)`` or ``(C, H, W)`` for 2D; ``(D, H, W)`` or ``(C, D, H, W)``
   for 3D -> channel-first float64;
2. window (centre, width): linear map to [0, 1] with clipping (DICOM VOI semantics);
3. resize every channel to ``size`` (linear interpolation, pixel centres aligned, Gaussian
   anti-aliasing when shrinking with sigma = (factor - 1) / 2: skimage's ``resize`` with
   ``order=1, mode="edge", anti_aliasing=True``);
4. channels: RGB -> gray with ITU-R 601 luma weights, or gray -> 3 identical channels;
5. intensity: ``minmax`` (per image to [0, 1]), ``zscore`` (per image to mean 0, std 1),
   ``fixed`` ((x - mean) / std with the stored mean and std) or ``none``.

JSON wire format (``to_json``)::

    {"format": "privmed-preprocess", "version": 1, "size": [H, W] | [D, H, W] | null,
     "channels": 1 | 3, "normalize": "minmax" | "zscore" | "fixed" | "none",
     "mean": float, "std": float, "window": [centre, width] | "file" | null,
     "spatial_dims": 2 | 3, "modalities": [str, ...] | null}
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from privmed.data.readers import apply_window, read_image
from privmed.errors import InputError

__all__ = ["Preprocess", "load_for_model", "resize", "sidecar_path"]

FORMAT = "privmed-preprocess"
VERSION = 1
NORMALIZATIONS = ("minmax", "zscore", "fixed", "none")
LUMA = np.array([0.299, 0.587, 0.114])


def resize(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Resize an N-D array to ``shape`` with linear interpolation and anti-aliasing.

    Output pixel i samples the input at (i + 0.5) * in / out - 0.5 (pixel centres aligned,
    as skimage and ``torch.nn.functional.interpolate(align_corners=False)``), edges
    replicated. When an axis shrinks by factor f > 1 it is first smoothed with a Gaussian of
    sigma (f - 1) / 2. Equal shapes return a float64 copy.
    """
    arr = np.asarray(image, dtype=np.float64)
    out_shape = tuple(int(n) for n in shape)
    if len(out_shape) != arr.ndim or min(out_shape) < 1:
        raise InputError(f"resize: expected {arr.ndim} positive sizes, got {tuple(shape)}")
    if out_shape == arr.shape:
        return arr.copy()
    factors = [i / o for i, o in zip(arr.shape, out_shape, strict=True)]
    sigma = [max(0.0, (f - 1.0) / 2.0) for f in factors]
    if any(s > 0 for s in sigma):
        arr = ndimage.gaussian_filter(arr, sigma, mode="nearest")
    coords = np.meshgrid(
        *[(np.arange(o) + 0.5) * f - 0.5 for o, f in zip(out_shape, factors, strict=True)],
        indexing="ij",
    )
    return ndimage.map_coordinates(arr, coords, order=1, mode="nearest")


@dataclass
class Preprocess:
    """How a file becomes a model input. See the module docstring for the steps.

    Attributes
    ----------
    size : (H, W), (D, H, W) or None
        Spatial output size; None keeps the input size.
    channels : 1 or 3
        Output channels (3 for ImageNet-style networks fed grayscale images).
    normalize : "minmax", "zscore", "fixed" or "none"
    mean, std : float
        Used by ``normalize="fixed"``.
    window : (centre, width), "file" or None
        VOI window in the reader's units (HU for CT). ``"file"`` uses each DICOM's own
        window when it has one (only in ``load_for_model``; ignored by ``apply`` on a bare
        array and for files without a window, e.g. PNG, which are already display values).
    spatial_dims : 2 or 3
        Used when ``size`` is None; otherwise ``len(size)``.
    modalities : list of str or None
        DICOM modalities the model accepts (e.g. ["CR", "DX"]); others are refused.
    """

    size: tuple[int, ...] | None = None
    channels: int = 1
    normalize: str = "minmax"
    mean: float = 0.0
    std: float = 1.0
    window: tuple[float, float] | str | None = None
    spatial_dims: int = 2
    modalities: list[str] | None = None

    def __post_init__(self) -> None:
        if self.size is not None:
            self.size = tuple(int(n) for n in self.size)
            if len(self.size) not in (2, 3) or min(self.size) < 1:
                raise InputError(f"preprocess size: expected (H, W) or (D, H, W), got {self.size}")
            self.spatial_dims = len(self.size)
        if self.spatial_dims not in (2, 3):
            raise InputError(f"preprocess spatial_dims: expected 2 or 3, got {self.spatial_dims}")
        if self.channels not in (1, 3):
            raise InputError(f"preprocess channels: expected 1 or 3, got {self.channels}")
        if self.normalize not in NORMALIZATIONS:
            raise InputError(
                f"preprocess normalize: expected one of {NORMALIZATIONS}, got {self.normalize!r}"
            )
        if self.normalize == "fixed" and not self.std > 0:
            raise InputError(f"preprocess std: expected > 0 for 'fixed', got {self.std}")
        if self.window is not None and self.window != "file":
            try:
                centre, width = (float(v) for v in self.window)
            except (TypeError, ValueError):
                raise InputError(
                    f"preprocess window: expected (centre, width) or 'file', got {self.window!r}"
                ) from None
            if not width > 0:
                raise InputError(f"preprocess window: expected width > 0, got {width}")
            self.window = (centre, width)
        if self.modalities is not None:
            self.modalities = [str(m).upper() for m in self.modalities]

    # -- serialisation -------------------------------------------------------------------
    def to_json(self) -> str:
        """The JSON wire format of the module docstring (stable key order)."""
        body: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "size": list(self.size) if self.size is not None else None,
            "channels": self.channels,
            "normalize": self.normalize,
            "mean": float(self.mean),
            "std": float(self.std),
            "window": list(self.window) if isinstance(self.window, tuple) else self.window,
            "spatial_dims": self.spatial_dims,
            "modalities": self.modalities,
        }
        return json.dumps(body, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, *, source: str = "preprocess JSON") -> Preprocess:
        """Parse ``to_json`` output; unknown keys or a wrong format/version raise InputError."""
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise InputError(f"{source}: expected format {FORMAT!r}")
        if body.get("version") != VERSION:
            raise InputError(f"{source}: expected version {VERSION}, got {body.get('version')!r}")
        fields = {k: v for k, v in body.items() if k not in ("format", "version")}
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise InputError(f"{source}: unknown keys {sorted(unknown)}")
        window = fields.get("window")
        if isinstance(window, list):
            fields["window"] = tuple(window)
        try:
            return cls(**fields)
        except TypeError as exc:
            raise InputError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> Path:
        Path(path).write_text(self.to_json(), encoding="utf-8")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> Preprocess:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise InputError(
                f"{p}: cannot read preprocessing description ({exc.strerror})"
            ) from None
        return cls.from_json(text, source=str(p))

    # -- the transform -------------------------------------------------------------------
    def _channel_first(self, arr: np.ndarray) -> np.ndarray:
        sd = self.spatial_dims
        if arr.ndim == sd:
            return arr[None]
        if arr.ndim == sd + 1:
            if sd == 2 and arr.shape[-1] == 3 and arr.shape[0] != 3:
                return np.moveaxis(arr, -1, 0)  # (H, W, 3) from Pillow
            if arr.shape[0] in (1, 3):
                return arr
        want = "(H, W), (H, W, 3) or (C, H, W)" if sd == 2 else "(D, H, W) or (C, D, H, W)"
        raise InputError(f"expected an image of shape {want} with C in (1, 3), got {arr.shape}")

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Turn one image into the model's input: float32 ``(C, H, W)`` or ``(C, D, H, W)``."""
        arr = self._channel_first(np.asarray(array, dtype=np.float64))
        if isinstance(self.window, tuple):
            arr = apply_window(arr, self.window).astype(np.float64)
        if self.size is not None:
            arr = np.stack([resize(ch, self.size) for ch in arr])
        if arr.shape[0] == 3 and self.channels == 1:
            arr = np.tensordot(LUMA, arr, axes=1)[None]
        elif arr.shape[0] == 1 and self.channels == 3:
            arr = np.repeat(arr, 3, axis=0)
        if self.normalize == "minmax":
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        elif self.normalize == "zscore":
            sd = float(arr.std())
            arr = (arr - arr.mean()) / sd if sd > 0 else arr - arr.mean()
        elif self.normalize == "fixed":
            arr = (arr - self.mean) / self.std
        return arr.astype(np.float32)


def load_for_model(path: str | Path, pre: Preprocess) -> np.ndarray:
    """Read any supported image file and preprocess it: float32 ``(1, C, H, W)`` (or 3D)."""
    array, meta = read_image(path, modalities=pre.modalities)
    if pre.window == "file" and meta.get("window") is not None:
        # meta["window"] is the file's VOI window in the returned units (MONOCHROME1 handled)
        array = apply_window(array, meta["window"])
    try:
        return pre.apply(array)[None]
    except InputError as exc:
        raise InputError(f"{path}: {exc}") from None


def sidecar_path(model_path: str | Path) -> Path:
    """``model.onnx`` -> ``model.preprocess.json`` (the description stored next to a model)."""
    p = Path(model_path)
    return p.with_name(p.with_suffix("").name + ".preprocess.json")
