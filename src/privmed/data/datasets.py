"""Dataset layouts -> ``Study``: one list of records (image, labels, site), whatever the layout.

``load_study(root)`` recognises, in this order:

1. ``root`` is a ``.npz`` file, or a folder with exactly one: **MedMNIST** (keys
   ``{train,val,test}_images`` / ``_labels``). MedMNIST has no institutions, so the split name
   is the site. Multi-label arrays (ChestMNIST) keep one column per label (NIH names for
   ChestMNIST); single-column class indices become one-hot ``class_<k>`` columns.
2. ``root`` is a ``.csv`` file, or a folder with a label table: **ChestX-ray14** (``Image
   Index`` + ``Finding Labels``) or **CheXpert** (``Path`` + one column per finding; see
   ``privmed.data.labels`` for the uncertain-label policy). Image files are looked up by the
   name in the table (anywhere below the table's folder) or by the relative path.
3. ``dataset.json`` or ``imagesTr/``: **NIfTI image/label pairs** (Medical Segmentation
   Decathlon). ``Record.mask_path`` is the label volume; findings are the non-background mask
   labels from ``dataset.json`` (``Study.mask_values`` their integers); the image-level label
   says whether that value occurs in the mask (filled by ``verify``; nan without it).
4. Sub-folders that are each a study of kinds 1-3 or 5: **site folders**; the sub-folder
   name is the site unless the table has a site column.
5. Sub-folders of images: **folder-per-class**, one-hot over the sorted class names.
6. Image files only: **unlabelled** images (no findings), e.g. for inference.

Without a site column or site folder the site is the study folder's name. Bad files (missing,
unreadable, bad label value) are listed in ``Study.skipped`` with the reason; everything else
loads. With ``verify=True`` (default) every image is decoded once at load time.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privmed.data.labels import (
    LabelTable,
    detect_convention,
    parse_chestxray14,
    parse_chexpert,
    read_csv,
)
from privmed.data.readers import image_kind, read_image
from privmed.errors import InputError

__all__ = ["Record", "Study", "load_study", "demo_study_path"]

log = logging.getLogger(__name__)

PREFERRED_TABLES = ("labels.csv", "Data_Entry_2017.csv", "train.csv")


@dataclass(eq=False)  # labels is an array: compare records by identity
class Record:
    """One image: ``labels`` is float32 over ``Study.findings`` with nan = unknown."""

    image_id: str
    path: Path
    labels: np.ndarray
    site: str
    mask_path: Path | None = None
    array_key: str | None = None  # MedMNIST: "<split>_images" inside the .npz at ``path``
    index: int | None = None  # MedMNIST: row in that array


@dataclass(eq=False)
class Study:
    root: Path
    findings: list[str]
    records: list[Record]
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    layout: str = ""
    mask_values: list[int] | None = None  # segmentation studies: mask value of each finding
    _arrays: dict[tuple[Path, str], np.ndarray] = field(
        default_factory=dict, repr=False, compare=False
    )

    def sites(self) -> list[str]:
        """Site names in order of first appearance."""
        return list(dict.fromkeys(r.site for r in self.records))

    def by_site(self) -> dict[str, list[Record]]:
        groups: dict[str, list[Record]] = {s: [] for s in self.sites()}
        for r in self.records:
            groups[r.site].append(r)
        return groups

    def labels(self, records: list[Record] | None = None) -> np.ndarray:
        """float32 ``(N, len(findings))`` label matrix (nan = unknown)."""
        recs = self.records if records is None else records
        if not recs:
            return np.zeros((0, len(self.findings)), dtype=np.float32)
        return np.stack([r.labels for r in recs]).astype(np.float32)

    def prevalence(self, records: list[Record] | None = None) -> dict[str, float]:
        """Fraction positive per finding among known labels (nan if none known)."""
        mat = self.labels(records)
        with np.errstate(invalid="ignore"):
            known = np.sum(~np.isnan(mat), axis=0)
            pos = np.nansum(mat, axis=0)
            frac = np.where(known > 0, pos / np.maximum(known, 1), np.nan)
        return {f: float(v) for f, v in zip(self.findings, frac, strict=True)}

    def select(self, sites: list[str]) -> Study:
        """A study with only the records of ``sites`` (same findings; shares the array cache)."""
        keep = [r for r in self.records if r.site in set(sites)]
        return Study(
            self.root, self.findings, keep, list(self.skipped), self.layout, self.mask_values,
            self._arrays,
        )  # fmt: skip

    def read(self, record: Record, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """The record's image as ``read_image`` returns it (MedMNIST rows scaled to [0, 1])."""
        if record.array_key is None:
            return read_image(record.path, **kwargs)
        key = (record.path, record.array_key)
        if key not in self._arrays:
            with np.load(record.path, allow_pickle=False) as npz:
                self._arrays[key] = npz[record.array_key]
        arr = self._arrays[key][record.index]
        scale = 255.0 if arr.dtype == np.uint8 else 1.0
        return arr.astype(np.float32) / np.float32(scale), {"format": "npz", "modality": None}

    def read_mask(self, record: Record) -> tuple[np.ndarray, dict[str, Any]]:
        if record.mask_path is None:
            raise InputError(f"{record.path}: record has no mask")
        mask, meta = read_image(record.mask_path)
        return np.rint(mask).astype(np.uint8), meta


def load_study(
    root: str | Path,
    *,
    uncertain: str = "zeros",
    blank: str = "zeros",
    findings: list[str] | None = None,
    verify: bool = True,
) -> Study:
    """Load a study from any supported layout (module docstring); see ``labels`` for policies.

    Raises ``InputError`` naming the file or folder when nothing loadable is found (missing
    folder, empty folder, table without label columns, corrupt ``.npz``).
    """
    from privmed.data import layouts

    p = Path(root)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    opts = {"uncertain": uncertain, "blank": blank, "findings": findings}
    study = layouts.load_any(p, opts, site_default=p.stem if p.is_file() else p.name)
    if study is None:
        children = [c for c in p.iterdir() if not c.name.startswith(".")] if p.is_dir() else []
        if not children:
            raise InputError(f"{p}: empty folder")
        raise InputError(
            f"{p}: no images or label table found (expected a ChestX-ray14/CheXpert CSV, "
            "MedMNIST .npz, imagesTr/ NIfTI pairs, class folders or image files)"
        )
    if verify:
        _verify(study)
    log.debug("%s: %s layout, %d records, %d skipped", p, study.layout, len(study.records),
              len(study.skipped))  # fmt: skip
    return study


def demo_study_path() -> Path:
    """Folder of the shipped synthetic demo study (12 PNGs, 3 sites; see its README.md)."""
    from importlib.resources import files

    return Path(str(files("privmed") / "assets" / "demo_study"))


def _verify(study: Study) -> None:
    """Decode every file once; move failures to ``skipped`` with the reader's message."""
    good = []
    for rec in study.records:
        try:
            image, _ = study.read(rec)
            if rec.mask_path is not None:
                mask, _ = read_image(rec.mask_path)
                if mask.shape != image.shape:
                    raise InputError(
                        f"{rec.mask_path}: mask shape {mask.shape} differs from image {image.shape}"
                    )
                if study.mask_values is not None:  # image-level label = value present in mask
                    present = np.isin(study.mask_values, np.unique(np.rint(mask)))
                    rec.labels = present.astype(np.float32)
        except InputError as exc:
            reason = str(exc)
            for prefix in (f"{rec.path}: ", f"{rec.mask_path}: "):
                reason = reason.removeprefix(prefix)
            study.skipped.append((rec.path, reason))
            continue
        good.append(rec)
    study.records = good


def table_to_records(
    table: LabelTable, table_path: Path, site_default: str, skipped: list[tuple[Path, str]]
) -> list[Record]:
    """Resolve each row's file (by relative path, else by name below the table's folder)."""
    base = table_path.parent
    by_name: dict[str, Path] = {}
    for f in sorted(base.rglob("*")):
        if f.is_file() and image_kind(f) is not None:
            by_name.setdefault(f.name, f)
    records = []
    seen: set[str] = set()
    for row in table.rows:
        path = _resolve(base, row.image, by_name)
        if path is None:
            skipped.append((base / row.image, f"{table_path.name} row {row.row}: file not found"))
            continue
        if row.image in seen:
            skipped.append((path, f"{table_path.name} row {row.row}: duplicate image"))
            continue
        seen.add(row.image)
        records.append(Record(row.image, path, row.labels, row.site or site_default))
    for n, image, reason in table.bad_rows:
        skipped.append((base / image, f"{table_path.name} row {n}: {reason}"))
    return records


def _resolve(base: Path, ref: str, by_name: dict[str, Path]) -> Path | None:
    rel = Path(ref)
    candidates = [base / rel, base.parent / rel]
    if len(rel.parts) > 1:  # CheXpert: "CheXpert-v1.0-small/train/..." relative to its parent
        candidates.append(base / Path(*rel.parts[1:]))
    for c in candidates:
        if c.is_file():
            return c
    return by_name.get(rel.name)


def parse_table(path: Path, opts: dict[str, Any]) -> LabelTable | None:
    """Parse a CSV if it follows a known convention; None if it has neither key column."""
    header, rows = read_csv(path)
    convention = detect_convention(header)
    if convention == "chestxray14":
        return parse_chestxray14(path, header, rows, opts.get("findings"))
    if convention == "chexpert":
        return parse_chexpert(
            path, header, rows, uncertain=opts["uncertain"], blank=opts["blank"],
            findings=opts.get("findings"),
        )  # fmt: skip
    if "Finding Labels" in header or any(h.lower() == "finding labels" for h in header):
        raise InputError(f"{path}: missing label column 'Image Index' (ChestX-ray14 layout)")
    return None


def merge_studies(root: Path, parts: list[Study], layout: str) -> Study:
    """Concatenate studies; findings in order of first appearance, absent ones nan (unknown)."""
    order = list(dict.fromkeys(f for s in parts for f in s.findings))
    records, skipped = [], []
    for s in parts:
        index = [s.findings.index(f) if f in s.findings else -1 for f in order]
        for r in s.records:
            vec = np.array([r.labels[i] if i >= 0 else np.nan for i in index], dtype=np.float32)
            records.append(
                Record(r.image_id, r.path, vec, r.site, r.mask_path, r.array_key, r.index)
            )
        skipped.extend(s.skipped)
    return Study(root, order, records, skipped, layout)


def read_msd_json(root: Path) -> dict[str, Any]:
    path = root / "dataset.json"
    try:
        body = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable dataset.json ({exc})") from None
    if not isinstance(body, dict):
        raise InputError(f"{path}: expected a JSON object")
    return body
