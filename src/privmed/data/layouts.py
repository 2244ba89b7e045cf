"""Layout detectors behind ``load_study``: each returns a ``Study`` or None if it does not apply.

Kept apart from ``datasets`` so each layout is one short function; the order of detection
(and what each layout means) is documented in ``privmed.data.datasets``.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from privmed.data.datasets import (
    PREFERRED_TABLES,
    Record,
    Study,
    merge_studies,
    parse_table,
    read_msd_json,
    table_to_records,
)
from privmed.data.labels import NIH_FINDINGS, LabelTable
from privmed.data.readers import image_kind
from privmed.errors import InputError

MEDMNIST_SPLITS = ("train", "val", "test")


def load_any(p: Path, opts: dict[str, Any], site_default: str) -> Study | None:
    """Try every layout on ``p`` in the documented order (site folders are one level deep)."""
    if p.is_file():
        if p.suffix.lower() == ".npz":
            return load_medmnist(p, site_default)
        if p.suffix.lower() == ".csv":
            table = parse_table(p, opts)
            if table is None:
                raise InputError(_no_label_columns(p))
            return _from_table(p, table, site_default)
        raise InputError(f"{p}: expected a folder, a .csv label table or a MedMNIST .npz")
    study = _labelled_in(p, opts, site_default)
    if study is not None:
        return study
    subdirs = sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
    if subdirs:
        parts = [_labelled_in(d, opts, d.name) for d in subdirs]
        if all(s is not None for s in parts):
            found = [s for s in parts if s is not None]
            layout = "site-folders/" + "+".join(sorted({s.layout for s in found}))
            return merge_studies(p, found, layout)
    classes = _class_folders(p, site_default)
    if classes is not None:
        return classes
    if subdirs:
        by_site = [_class_folders(d, d.name) for d in subdirs]
        if all(s is not None for s in by_site):
            found = [s for s in by_site if s is not None]
            return merge_studies(p, found, "site-folders/class-folders")
    images = _images_in(p)
    if images:
        records = [Record(f.name, f, np.zeros(0, np.float32), site_default) for f in images]
        return Study(p, [], records, [], "unlabelled")
    return None


def _labelled_in(p: Path, opts: dict[str, Any], site_default: str) -> Study | None:
    """A label table, a MedMNIST .npz or NIfTI pairs directly in folder ``p``."""
    for detector in (_npz_in, _table_in, _nifti_pairs):
        study = detector(p, opts, site_default)
        if study is not None:
            return study
    return None


def _no_label_columns(p: Path) -> str:
    return (
        f"{p}: missing label columns: expected 'Image Index' + 'Finding Labels' (ChestX-ray14) "
        "or 'Path' + one column per finding (CheXpert)"
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and image_kind(f) is not None)


def _from_table(path: Path, table: LabelTable, site_default: str) -> Study:
    skipped: list[tuple[Path, str]] = []
    records = table_to_records(table, path, site_default, skipped)
    return Study(path.parent, table.findings, records, skipped, table.convention)


def _table_in(p: Path, opts: dict[str, Any], site_default: str) -> Study | None:
    csvs = sorted(p.glob("*.csv"))
    if not csvs:
        return None
    tables = [(c, parse_table(c, opts)) for c in csvs]
    known = [(c, t) for c, t in tables if t is not None]
    if not known:
        if len(csvs) == 1:
            raise InputError(_no_label_columns(csvs[0]))
        return None
    if len(known) > 1:
        preferred = [(c, t) for c, t in known if c.name in PREFERRED_TABLES]
        if len(preferred) != 1:
            names = ", ".join(c.name for c, _ in known)
            raise InputError(f"{p}: several label tables ({names}); pass one .csv file instead")
        known = preferred
    path, table = known[0]
    return _from_table(path, table, site_default)


def _npz_in(p: Path, opts: dict[str, Any], site_default: str) -> Study | None:
    npzs = sorted(p.glob("*.npz"))
    if not npzs:
        return None
    if len(npzs) > 1:
        raise InputError(f"{p}: several .npz files ({', '.join(n.name for n in npzs)}); pass one")
    return load_medmnist(npzs[0], site_default)


def load_medmnist(path: Path, site_default: str) -> Study:
    """MedMNIST ``.npz``: the split name is the site (MedMNIST has no institutions)."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            shapes = {k: npz[k].shape for k in keys if k.endswith("_labels")}
            labels = {k: np.asarray(npz[k]) for k in shapes}
            n_images = {k: npz[k].shape[0] for k in keys if k.endswith("_images")}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(f"{path}: not a readable .npz ({exc.__class__.__name__}: {exc})") from None
    splits = [s for s in MEDMNIST_SPLITS if f"{s}_images" in keys and f"{s}_labels" in keys]
    if not splits:
        raise InputError(f"{path}: missing MedMNIST arrays '<split>_images' and '<split>_labels'")
    widths = {labels[f"{s}_labels"].reshape(n_images[f"{s}_images"], -1).shape[1] for s in splits}
    if len(widths) != 1:
        raise InputError(f"{path}: label arrays differ in width across splits: {sorted(widths)}")
    width = widths.pop()
    if width == 1:
        n_classes = int(max(labels[f"{s}_labels"].max() for s in splits)) + 1
        findings = [f"class_{k}" for k in range(n_classes)]
    elif path.name.lower().startswith("chestmnist") and width == len(NIH_FINDINGS):
        findings = list(NIH_FINDINGS)
    else:
        findings = [f"label_{k}" for k in range(width)]
    records = []
    for s in splits:
        lab = labels[f"{s}_labels"].reshape(n_images[f"{s}_images"], -1)
        for i in range(lab.shape[0]):
            vec = np.eye(len(findings), dtype=np.float32)[int(lab[i, 0])] if width == 1 else lab[i]
            records.append(
                Record(f"{s}_{i:05d}", path, vec.astype(np.float32), s, None, f"{s}_images", i)
            )
    return Study(path.parent, findings, records, [], "medmnist")


def _strip_channel(name: str) -> str:
    """nnU-Net names images ``case_0000.nii.gz`` and labels ``case.nii.gz``."""
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else Path(name).stem
    return stem[:-5] if len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit() else stem


def _nifti_pairs(p: Path, opts: dict[str, Any], site_default: str) -> Study | None:
    has_json = (p / "dataset.json").is_file()
    if not has_json and not (p / "imagesTr").is_dir():
        return None
    body = read_msd_json(p) if has_json else {}
    label_names = body.get("labels", {}) if isinstance(body.get("labels"), dict) else {}
    try:
        named = sorted((int(k), str(v)) for k, v in label_names.items() if int(k) != 0)
    except ValueError:
        raise InputError(f"{p / 'dataset.json'}: 'labels' keys must be integers") from None
    findings = [name for _, name in named]
    unknown = np.full(len(findings), np.nan, dtype=np.float32)
    records, skipped = [], []
    entries = body.get("training") if isinstance(body.get("training"), list) else None
    if entries is not None:
        for e in entries:
            image = p / str(e.get("image", ""))
            label = p / str(e.get("label", "")) if e.get("label") else None
            if not image.is_file():
                skipped.append((image, "dataset.json: image file not found"))
                continue
            if label is not None and not label.is_file():
                skipped.append((label, "dataset.json: label file not found"))
                continue
            site = str(e.get("site") or site_default)
            records.append(Record(_strip_channel(image.name), image, unknown.copy(), site, label))
    else:
        labels = {_strip_channel(f.name): f for f in sorted((p / "labelsTr").glob("*.nii*"))}
        for f in sorted((p / "imagesTr").glob("*.nii*")):
            case = _strip_channel(f.name)
            if case not in labels:
                skipped.append((f, "no matching file in labelsTr/"))
                continue
            records.append(Record(case, f, unknown.copy(), site_default, labels[case]))
    return Study(p, findings, records, skipped, "nifti-pairs", [v for v, _ in named])


def _class_folders(p: Path, site_default: str) -> Study | None:
    classes = sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith("."))
    files = {d.name: _images_in(d) for d in classes}
    if not classes or not all(files.values()):
        return None
    findings = [d.name for d in classes]
    eye = np.eye(len(findings), dtype=np.float32)
    records = [
        Record(f"{name}/{f.name}", f, eye[k].copy(), site_default)
        for k, name in enumerate(findings)
        for f in files[name]
    ]
    return Study(p, findings, records, [], "class-folders")
