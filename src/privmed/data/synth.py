"""Synthetic multi-site chest radiographs (and, re-exported, CT volumes) with learnable findings.

No public medical dataset can be downloaded on the machines privmed is built on, so tests,
demos and training runs use phantoms that look enough like chest radiographs for a model to
learn real-looking findings, and whose sites differ the way real hospitals differ.

A chest phantom (``chest_phantom``) is drawn on a normalised grid (y, x in [-1, 1], y down):
body outline, two lungs with vascular texture, posterior ribs, spine, mediastinum and heart
shadow. Findings (multi-label, any combination):

- ``opacity``: a diffuse, textured patch of increased density inside one lung;
- ``nodule``: a small bright disc inside a lung;
- ``effusion``: fluid density filling a lung base with a meniscus that rises laterally
  (the costophrenic angle is blunted);
- ``cardiomegaly``: the heart shadow is 30-50 % wider (cardiothoracic ratio > 0.5).

A ``SiteStyle`` changes what a scanner and a population change: gamma, contrast and
brightness of the detector response, noise level, blur (resolution), finding prevalence, and
how the DICOM stores pixels (MONOCHROME1, rescale slope/intercept, pixel spacing).

Everything is deterministic for a given seed: every image has its own generator seeded with
``(seed, site_index, image_index)``, so adding sites or images never changes the others.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from privmed.data.synth_ct import ct_phantom, synth_ct_study
from privmed.errors import InputError

__all__ = [
    "FINDINGS",
    "SiteStyle",
    "site_styles",
    "chest_phantom",
    "synth_chest_study",
    "ct_phantom",
    "synth_ct_study",
]

log = logging.getLogger(__name__)

FINDINGS: list[str] = ["opacity", "nodule", "effusion", "cardiomegaly"]

# columns of NIH ChestX-ray14 Data_Entry_2017.csv that we fill, plus our "site"
LABEL_COLUMNS = [
    "Image Index",
    "Finding Labels",
    "Follow-up #",
    "Patient ID",
    "Patient Age",
    "Patient Gender",
    "View Position",
    "site",
]


def _prevalence(opacity: float, nodule: float, effusion: float, cardio: float) -> dict[str, float]:
    return dict(zip(FINDINGS, (opacity, nodule, effusion, cardio), strict=True))


@dataclass(frozen=True)
class SiteStyle:
    """How one synthetic institution's scanner, protocol and population differ.

    Image effects are applied in this order to the anatomy in [0, 1]: blur (Gaussian sigma in
    pixels at 64 px, scaled with the image size), gamma, contrast about 0.5, brightness
    offset, additive Gaussian noise of std ``noise``, clip to [0, 1].
    ``monochrome1``, ``rescale`` (slope, intercept) and ``pixel_spacing`` (mm) only affect
    how the image is stored as DICOM; a correct reader undoes them.
    """

    name: str
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    noise: float = 0.02
    blur: float = 0.0
    prevalence: Mapping[str, float] = field(
        default_factory=lambda: _prevalence(0.3, 0.25, 0.2, 0.25)
    )
    monochrome1: bool = False
    rescale: tuple[float, float] = (1.0, 0.0)
    pixel_spacing: float = 0.5


_PRESET_SITES = (
    SiteStyle("site_a"),
    SiteStyle(
        "site_b",
        gamma=1.3,
        contrast=0.8,
        brightness=0.06,
        noise=0.035,
        blur=0.7,
        prevalence=_prevalence(0.4, 0.2, 0.3, 0.2),
        monochrome1=True,
        rescale=(2.0, -1024.0),
        pixel_spacing=0.7,
    ),
    SiteStyle(
        "site_c",
        gamma=0.8,
        contrast=1.15,
        brightness=-0.05,
        noise=0.03,
        blur=0.4,
        prevalence=_prevalence(0.25, 0.3, 0.15, 0.35),
        rescale=(0.5, 100.0),
        pixel_spacing=0.4,
    ),
    SiteStyle(
        "site_d",
        gamma=1.15,
        contrast=0.9,
        brightness=0.0,
        noise=0.05,
        blur=1.2,
        prevalence=_prevalence(0.35, 0.25, 0.25, 0.3),
        pixel_spacing=0.9,
    ),
)


def site_styles(n: int) -> list[SiteStyle]:
    """The first ``n`` site styles: four fixed presets, then seeded variations of them.

    Site ``i >= 4`` is drawn from ``default_rng(1000 + i)`` so the list is the same on every
    machine and adding sites never changes earlier ones.
    """
    if n < 1:
        raise InputError(f"sites: expected at least 1, got {n}")
    styles = list(_PRESET_SITES[:n])
    for i in range(len(styles), n):
        rng = np.random.default_rng(1000 + i)
        prev = rng.uniform(0.15, 0.4, size=len(FINDINGS))
        styles.append(
            SiteStyle(
                f"site_{i}",
                gamma=float(rng.uniform(0.75, 1.4)),
                contrast=float(rng.uniform(0.75, 1.2)),
                brightness=float(rng.uniform(-0.06, 0.06)),
                noise=float(rng.uniform(0.015, 0.05)),
                blur=float(rng.uniform(0.0, 1.2)),
                prevalence=_prevalence(*(float(p) for p in prev)),
                monochrome1=bool(i % 2),
                rescale=(
                    float(rng.choice([0.5, 1.0, 2.0])),
                    float(rng.choice([-1024.0, 0.0, 100.0])),
                ),
                pixel_spacing=float(rng.uniform(0.4, 0.9)),
            )
        )
    return styles


def _soft_inside(signed_dist: np.ndarray, edge: float) -> np.ndarray:
    """Anti-aliased indicator: 1 well inside (negative distance), 0 well outside."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_dist / edge, -50.0, 50.0)))


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, ay: float, ax: float
) -> np.ndarray:
    """Approximate signed distance to an ellipse boundary (negative inside)."""
    r = np.sqrt(((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2)
    return (r - 1.0) * min(ay, ax)


def _smooth_noise(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Gaussian random field with unit standard deviation (texture for lungs and opacities)."""
    field_ = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma_px, mode="wrap")
    return field_ / (field_.std() + 1e-12)


def _lung(y: np.ndarray, x: np.ndarray, cy: float, cx: float, ay: float, ax: float) -> np.ndarray:
    """Lung field: round apex, flat base (exponent 4 below the centre) so the costophrenic angle is sharp."""
    u = np.abs((x - cx) / ax)
    v = (y - cy) / ay
    r = (u**2.2 + np.where(v > 0, np.abs(v) ** 4.0, v**2)) ** (1 / 2.2)
    return (r - 1.0) * min(ay, ax)


def chest_phantom(
    rng: np.random.Generator, size: int, site: SiteStyle, findings: Mapping[str, bool]
) -> np.ndarray:
    """Draw one chest-radiograph-like image.

    Parameters
    ----------
    rng : numpy.random.Generator
        The only source of randomness (anatomy, finding placement, noise).
    size : int
        Output is ``size`` x ``size`` pixels (>= 16).
    site : SiteStyle
        Detector response, noise and blur of the acquiring site.
    findings : mapping of str to bool
        Which of ``FINDINGS`` are present; missing keys mean absent.

    Returns
    -------
    numpy.ndarray
        float32 ``(size, size)`` in [0, 1]; brighter means denser (bone white, lungs dark).
    """
    unknown = set(findings) - set(FINDINGS)
    if unknown:
        raise InputError(f"findings: unknown {sorted(unknown)}, expected a subset of {FINDINGS}")
    if size < 16:
        raise InputError(f"size: expected >= 16 pixels, got {size}")
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    y, x = np.meshgrid(c, c, indexing="ij")
    edge = 1.2 / size  # ~0.6 pixel: anti-aliased edges

    s = rng.uniform(0.92, 1.05)  # patient habitus
    dx, dy = rng.uniform(-0.04, 0.04, size=2)

    body = _soft_inside(_ellipse(y, x, 0.12 + dy, dx, 1.08 * s, 0.9 * s), 3 * edge)
    img = 0.5 * body
    spine = _soft_inside(np.abs(x - dx) - 0.07 * s, edge) * body
    img += 0.12 * spine

    lung_masks = []
    lung_geom = []
    for side in (-1.0, 1.0):
        ax = 0.25 * s * rng.uniform(0.95, 1.05)
        ay = 0.56 * s * rng.uniform(0.95, 1.05)
        cx = dx + side * 0.36 * s
        cy = dy - 0.08
        lung_masks.append(_soft_inside(_lung(y, x, cy, cx, ay, ax), edge))
        lung_geom.append((cy, cx, ay, ax, side))
    lungs = np.clip(lung_masks[0] + lung_masks[1], 0.0, 1.0)
    texture = _smooth_noise(rng, size, size / 48)
    img -= lungs * (0.34 - 0.03 * texture)  # aerated lung with vascular markings

    # posterior ribs: curved bands, visible over the lungs
    ribs = np.zeros_like(img)
    for k in range(9):
        y0 = dy + s * (-0.74 + 0.135 * k)
        for side in (-1.0, 1.0):
            u = (x - dx) * side
            curve = y0 - 0.12 * u + 0.55 * u**2  # rises from the spine, then falls laterally
            band = _soft_inside(np.abs(y - curve) - 0.03 * s, edge)
            ribs += band * _soft_inside(-(u - 0.06), edge) * _soft_inside(u - 0.86 * s, edge)
    img += 0.07 * np.clip(ribs, 0.0, 1.0) * body

    # mediastinum and heart: soft tissue laid over the lungs
    media = _soft_inside(np.abs(x - dx) - 0.11 * s, 2 * edge) * _soft_inside(
        y - (0.3 + dy), 2 * edge
    )
    ctr = rng.uniform(1.3, 1.5) if findings.get("cardiomegaly", False) else rng.uniform(0.88, 1.03)
    heart = _soft_inside(
        _ellipse(
            y, x, dy + 0.33 * s, dx + 0.07 * s, 0.22 * s * (1 + 0.3 * (ctr - 1)), 0.27 * s * ctr
        ),
        2 * edge,
    )
    cover = np.clip(media + heart, 0.0, 1.0)
    img += cover * (0.52 - img) * 0.92 * body

    if findings.get("opacity", False):
        cy, cx, ay, ax, _ = lung_geom[int(rng.integers(2))]
        oy = cy + rng.uniform(-0.35, 0.45) * ay
        ox = cx + rng.uniform(-0.45, 0.45) * ax
        sigma = rng.uniform(0.11, 0.18) * s
        blob = np.exp(-((y - oy) ** 2 + (x - ox) ** 2) / (2 * sigma**2))
        patchy = np.clip(1.0 + 0.5 * _smooth_noise(rng, size, size / 24), 0.2, 2.0)
        img += rng.uniform(0.2, 0.3) * blob * patchy * lungs
    if findings.get("nodule", False):
        cy, cx, ay, ax, _ = lung_geom[int(rng.integers(2))]
        # centre inside the lung, away from the heart and the base
        ny = cy + rng.uniform(-0.6, 0.35) * ay
        nx = cx + rng.uniform(-0.5, 0.5) * ax
        radius = rng.uniform(0.065, 0.095) * s
        disc = _soft_inside(np.sqrt((y - ny) ** 2 + (x - nx) ** 2) - radius, edge)
        img += rng.uniform(0.35, 0.45) * disc
    if findings.get("effusion", False):
        sides = [0, 1] if rng.random() < 0.3 else [int(rng.integers(2))]
        for i in sides:
            cy, cx, ay, ax, side = lung_geom[i]
            lateral = np.clip((x - cx) * side / ax, 0.0, 1.0)
            level = cy + ay * (1.0 - rng.uniform(0.4, 0.65)) - 0.3 * ay * lateral  # meniscus
            fluid = _soft_inside(level - y, 2 * edge) * lung_masks[i]
            img += fluid * (0.5 - img) * 0.95

    return _site_response(rng, np.clip(img, 0.0, 1.0), site, size)


def _site_response(
    rng: np.random.Generator, img: np.ndarray, site: SiteStyle, size: int
) -> np.ndarray:
    if site.blur > 0:
        img = ndimage.gaussian_filter(img, site.blur * size / 64, mode="nearest")
    img = np.clip(img, 0.0, 1.0) ** site.gamma
    img = (img - 0.5) * site.contrast + 0.5 + site.brightness
    img = img + rng.normal(0.0, site.noise, size=img.shape)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def _label_string(present: list[str]) -> str:
    return "|".join(present) if present else "No Finding"


def synth_chest_study(
    out_dir: str | Path,
    sites: int = 3,
    n_per_site: int = 100,
    size: int = 64,
    fmt: str = "png",
    seed: int = 0,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a multi-site chest-radiograph study in NIH ChestX-ray14 layout.

    Layout::

        out_dir/labels.csv            Data_Entry_2017.csv columns + "site"
        out_dir/images/<Image Index>  00000001_000.png (or .dcm) ...

    ``Finding Labels`` joins the present findings with ``|`` in ``FINDINGS`` order, or is
    ``No Finding``. Patient IDs are unique across sites (site i uses 100000*i + 1, ...).
    With ``fmt="dicom"`` each image is a CR DICOM (16-bit, 12 bits stored) using the site's
    rescale slope/intercept, photometric interpretation and pixel spacing, with a window
    centre/width covering the image.

    ``progress(done, total)`` is called after each image. Returns ``out_dir``.
    """
    from privmed.data.writers import write_chest_dicom, write_png

    if fmt not in ("png", "dicom"):
        raise InputError(f"format: expected 'png' or 'dicom', got {fmt!r}")
    if n_per_site < 1:
        raise InputError(f"n_per_site: expected at least 1, got {n_per_site}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    styles = site_styles(sites)
    total = sites * n_per_site
    rows: list[dict[str, str]] = []
    done = 0
    for si, style in enumerate(styles):
        site_rng = np.random.default_rng([seed, si])
        prev = np.array([style.prevalence[f] for f in FINDINGS])
        labels = site_rng.random((n_per_site, len(FINDINGS))) < prev
        ages = site_rng.integers(18, 90, size=n_per_site)
        sexes = site_rng.choice(["M", "F"], size=n_per_site)
        for i in range(n_per_site):
            present = {f: bool(v) for f, v in zip(FINDINGS, labels[i], strict=True)}
            img = chest_phantom(np.random.default_rng([seed, si, i]), size, style, present)
            patient = 100000 * si + i + 1
            name = f"{patient:08d}_000.{'png' if fmt == 'png' else 'dcm'}"
            if fmt == "png":
                write_png(out / "images" / name, img)
            else:
                write_chest_dicom(
                    out / "images" / name,
                    img,
                    style,
                    patient_id=f"{patient:08d}",
                    uid_entropy=[str(seed), style.name, str(i)],
                )
            rows.append(
                {
                    "Image Index": name,
                    "Finding Labels": _label_string([f for f in FINDINGS if present[f]]),
                    "Follow-up #": "0",
                    "Patient ID": str(patient),
                    "Patient Age": str(int(ages[i])),
                    "Patient Gender": str(sexes[i]),
                    "View Position": "PA",
                    "site": style.name,
                }
            )
            done += 1
            if progress is not None:
                progress(done, total)
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    log.debug("wrote %d %s images to %s", total, fmt, out)
    return out
