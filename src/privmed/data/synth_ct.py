"""Synthetic chest CT volumes with lung and lesion masks, written as an MSD-style NIfTI study.

Volumes are in numpy order (D, H, W) = (axial slice inferior->superior, row anterior->posterior,
column patient right->left), in Hounsfield-like units: air -1000, lung about -850 with vessel
texture, fat -100, soft tissue 40, bone 400-700. The mask uses MSD-style integer labels::

    0 background, 1 lung (aerated lung not covered by a lesion), 2 lesion

Lesions (0-4 per volume, at least one in 85 % of volumes) vary in size (radius 2-9 voxels at
64^3), shape (lobulated by a noise-modulated radius) and texture: solid (about 40 HU),
ground-glass (about -500 HU, patchy) or part-solid (ground-glass halo with a solid core).
Sites differ in noise, contrast, offset, blur and voxel spacing.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from privmed.errors import InputError

log = logging.getLogger(__name__)

CT_LABELS = {"0": "background", "1": "lung", "2": "lesion"}


@dataclass(frozen=True)
class CTSiteStyle:
    """Scanner differences between CT sites: HU = contrast * true + offset + N(0, noise^2)."""

    name: str
    noise: float = 15.0
    contrast: float = 1.0
    offset: float = 0.0
    blur: float = 0.0
    spacing: tuple[float, float, float] = (2.0, 0.8, 0.8)  # mm, (D, H, W)


CT_SITES = (
    CTSiteStyle("site_a"),
    CTSiteStyle(
        "site_b", noise=35.0, contrast=0.92, offset=15.0, blur=0.7, spacing=(2.5, 0.7, 0.7)
    ),
    CTSiteStyle(
        "site_c", noise=25.0, contrast=1.08, offset=-20.0, blur=0.3, spacing=(1.5, 0.9, 0.9)
    ),
)


def _grid(shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    axes = [(np.arange(n) + 0.5) / n * 2.0 - 1.0 for n in shape]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    return z, y, x


def _smooth_field(
    rng: np.random.Generator, shape: tuple[int, int, int], sigma: float
) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-12)


def ct_phantom(
    rng: np.random.Generator,
    shape: tuple[int, int, int] = (64, 64, 64),
    site: CTSiteStyle | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one chest CT volume and its mask.

    Returns
    -------
    volume : numpy.ndarray
        float32 ``shape`` in Hounsfield-like units (after the site's response).
    mask : numpy.ndarray
        uint8 ``shape``: 0 background, 1 lung, 2 lesion.
    """
    if len(shape) != 3 or min(shape) < 16:
        raise InputError(f"shape: expected 3 sizes >= 16, got {tuple(shape)}")
    site = site or CT_SITES[0]
    shape = (int(shape[0]), int(shape[1]), int(shape[2]))
    z, y, x = _grid(shape)
    s = rng.uniform(0.92, 1.05)

    body_r = np.sqrt((y / (0.68 * s)) ** 2 + (x / (0.92 * s)) ** 2)
    body = body_r < 1.0
    vol = np.full(shape, -1000.0)
    vol[body] = 40.0
    vol[body & (body_r > 0.9)] = -100.0  # subcutaneous fat
    ribs = body & (body_r > 0.8) & (body_r < 0.86) & (np.sin(z * 9.0 * np.pi + 1.0) > 0.55)
    vol[ribs] = 650.0
    spine_r = np.sqrt(((y - 0.48 * s) / 0.13) ** 2 + (x / 0.12) ** 2)
    vol[spine_r < 1.0] = 300.0
    vol[(spine_r < 1.0) & (spine_r > 0.75)] = 700.0

    lung = np.zeros(shape, dtype=bool)
    for side in (-1.0, 1.0):
        cx = side * 0.42 * s
        r = np.sqrt(
            ((x - cx) / (0.3 * s)) ** 2 + ((y + 0.02) / (0.44 * s)) ** 2 + ((z - 0.1) / 0.88) ** 2
        )
        lung |= r < 1.0
    heart = (
        np.sqrt(
            ((x - 0.1 * s) / (0.33 * s)) ** 2
            + ((y + 0.18 * s) / (0.3 * s)) ** 2
            + ((z + 0.4) / 0.4) ** 2
        )
        < 1.0
    )
    lung &= ~heart & (spine_r > 1.3)
    vessels = _smooth_field(rng, shape, min(shape) / 40)
    vol[lung] = -850.0 + 60.0 * np.clip(vessels[lung], -1.0, 3.0)
    vol[heart] = 45.0

    lesion = np.zeros(shape, dtype=bool)
    n_lesions = int(rng.integers(1, 5)) if rng.random() < 0.85 else 0
    index = np.indices(shape, dtype=np.float32)  # voxel coordinates for lesion distances
    lung_idx = np.argwhere(ndimage.binary_erosion(lung, iterations=2))
    for _ in range(n_lesions if len(lung_idx) else 0):
        centre = lung_idx[int(rng.integers(len(lung_idx)))]
        radius = rng.uniform(2.0, 9.0) * min(shape) / 64
        kind = rng.choice(["solid", "ground_glass", "part_solid"])
        lobes = 1.0 + 0.25 * _smooth_field(rng, shape, 2.0)
        d = np.sqrt(sum((g - c) ** 2 for g, c in zip(index, centre, strict=True)))
        blob = (d < radius * lobes) & lung
        tex = _smooth_field(rng, shape, 1.0)
        if kind == "solid":
            vol[blob] = 40.0 + 15.0 * tex[blob]
        else:
            vol[blob] = -520.0 + 90.0 * tex[blob]
            if kind == "part_solid":
                core = (d < 0.45 * radius * lobes) & lung
                vol[core] = 35.0 + 15.0 * tex[core]
        lesion |= blob

    mask = np.zeros(shape, dtype=np.uint8)
    mask[lung] = 1
    mask[lesion] = 2
    if site.blur > 0:
        vol = ndimage.gaussian_filter(vol, site.blur, mode="nearest")
    vol = vol * site.contrast + site.offset + rng.normal(0.0, site.noise, size=shape)
    return vol.astype(np.float32), mask


def ct_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel (d, r, c) -> RAS mm for axial slices: d superior, r posterior, c patient left.

    The volume is centred on the origin. This is the affine a DICOM series of axial slices with
    ImageOrientationPatient (1,0,0,0,1,0) gives (LPS converted to RAS).
    """
    sz, sy, sx = spacing
    aff = np.array(
        [
            [0.0, 0.0, -sx, 0.0],
            [0.0, -sy, 0.0, 0.0],
            [sz, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    centre = aff[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    aff[:3, 3] = -centre
    return aff


def synth_ct_study(
    out_dir: str | Path,
    n_volumes: int = 8,
    shape: tuple[int, int, int] = (64, 64, 64),
    seed: int = 0,
    sites: int = 2,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write an MSD-style CT study: imagesTr/, labelsTr/ and dataset.json.

    Volume ``i`` comes from site ``i % sites`` and its own generator ``default_rng([seed, i])``.
    ``dataset.json`` follows the Medical Segmentation Decathlon schema (name, modality, labels,
    numTraining, training[{image, label}]) with an extra ``site`` key per training entry.
    Returns ``out_dir``.
    """
    from privmed.data.writers import write_nifti

    if n_volumes < 1:
        raise InputError(f"n_volumes: expected at least 1, got {n_volumes}")
    if not 1 <= sites <= len(CT_SITES):
        raise InputError(f"sites: expected 1..{len(CT_SITES)} for CT, got {sites}")
    out = Path(out_dir)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    shape3 = (int(shape[0]), int(shape[1]), int(shape[2]))
    training = []
    for i in range(n_volumes):
        style = CT_SITES[i % sites]
        vol, mask = ct_phantom(np.random.default_rng([seed, i]), shape3, style)
        aff = ct_affine(shape3, style.spacing)
        name = f"lung_{i + 1:03d}.nii.gz"
        write_nifti(out / "imagesTr" / name, np.rint(vol).astype(np.int16), aff)  # CT is int16 HU
        write_nifti(out / "labelsTr" / name, mask, aff)
        training.append(
            {"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}", "site": style.name}
        )
        if progress is not None:
            progress(i + 1, n_volumes)
    dataset = {
        "name": "privmed-synthetic-lung",
        "description": f"synthetic chest CT phantoms, seed {seed}",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": CT_LABELS,
        "numTraining": n_volumes,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n", encoding="utf-8")
    log.debug("wrote %d CT volumes to %s", n_volumes, out)
    return out
