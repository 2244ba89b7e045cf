"""Label tables: NIH ChestX-ray14 and CheXpert CSV conventions -> per-image label vectors.

ChestX-ray14 (``Data_Entry_2017.csv``): column ``Image Index`` names the file, column
``Finding Labels`` joins findings with ``|`` or says ``No Finding``. Every label is known
(1 if listed, else 0).

CheXpert (``train.csv``): column ``Path`` names the file; one column per observation with
``1.0`` positive, ``0.0`` negative, ``-1.0`` uncertain, blank not mentioned. Policies
(Irvin et al., AAAI 2019, section "Uncertainty approaches"):

- ``uncertain="zeros"`` (U-Zeros, default): -1 -> 0;
- ``uncertain="ones"`` (U-Ones): -1 -> 1;
- ``uncertain="ignore"`` (U-Ignore): -1 -> nan (unknown; a loss should mask it);
- ``blank="zeros"`` (default): not mentioned -> 0, as in the CheXpert baselines;
  ``blank="nan"``: not mentioned -> nan.

``No Finding`` is one of CheXpert's 14 observations and is kept as a label column.
A row whose label value is none of these is reported (row number, column, value) and skipped.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from privmed.errors import InputError

NIH_FINDINGS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
]  # fmt: skip
CHEXPERT_FINDINGS = [
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices",
]  # fmt: skip
# CheXpert columns that are not observations
CHEXPERT_META = {"path", "sex", "age", "frontal/lateral", "ap/pa", "patient id", "study"}
SITE_COLUMNS = ("site", "institution", "hospital")
UNCERTAIN_POLICIES = ("zeros", "ones", "ignore")
BLANK_POLICIES = ("zeros", "nan")


@dataclass
class LabelRow:
    """One parsed table row: file reference as written, label vector, site (None if no column)."""

    row: int  # 1-based data row number (header is row 0) for error messages
    image: str
    labels: np.ndarray
    site: str | None


@dataclass
class LabelTable:
    convention: str  # "chestxray14" | "chexpert"
    findings: list[str]
    rows: list[LabelRow]
    bad_rows: list[tuple[int, str, str]]  # (row, image as written, reason)


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header (stripped) and rows of a CSV file; InputError if unreadable or empty."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise InputError(f"{path}: empty CSV file")
            header = [h.strip() for h in header]
            rows = [dict(zip(header, (v.strip() for v in r), strict=False)) for r in reader if r]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path}: unreadable CSV ({exc.__class__.__name__}: {exc})") from None
    return header, rows


def detect_convention(header: list[str]) -> str | None:
    """``"chestxray14"`` if ``Image Index`` is a column, ``"chexpert"`` if ``Path`` is, else None."""
    lower = {h.lower() for h in header}
    if "image index" in lower:
        return "chestxray14"
    if "path" in lower:
        return "chexpert"
    return None


def _column(header: list[str], name: str) -> str | None:
    return next((h for h in header if h.lower() == name.lower()), None)


def _site_column(header: list[str]) -> str | None:
    return next((h for h in header if h.lower() in SITE_COLUMNS), None)


def canonical_order(names: set[str]) -> list[str]:
    """Known label sets keep their published order (the full set); anything else is sorted."""
    from privmed.data.synth import FINDINGS

    for known in (FINDINGS, NIH_FINDINGS, CHEXPERT_FINDINGS):
        if names <= set(known):
            return list(known)
    return sorted(names)


def parse_chestxray14(
    path: Path, header: list[str], rows: list[dict[str, str]], findings: list[str] | None = None
) -> LabelTable:
    """Parse ChestX-ray14 rows; ``findings`` fixes the label order (others are dropped)."""
    image_col = _column(header, "Image Index")
    label_col = _column(header, "Finding Labels")
    if image_col is None or label_col is None:
        missing = "Image Index" if image_col is None else "Finding Labels"
        raise InputError(f"{path}: missing label column {missing!r} (ChestX-ray14 layout)")
    site_col = _site_column(header)
    split = [[t.strip() for t in r.get(label_col, "").split("|") if t.strip()] for r in rows]
    names = {t for labels in split for t in labels if t != "No Finding"}
    order = list(findings) if findings is not None else canonical_order(names)
    position = {f: i for i, f in enumerate(order)}
    out: list[LabelRow] = []
    bad: list[tuple[int, str, str]] = []
    for n, (r, labels) in enumerate(zip(rows, split, strict=True), start=1):
        image = r.get(image_col, "")
        if not image:
            bad.append((n, image, f"empty {image_col!r}"))
            continue
        if not labels:
            bad.append((n, image, f"empty {label_col!r} (expected findings or 'No Finding')"))
            continue
        vec = np.zeros(len(order), dtype=np.float32)
        for t in labels:
            if t in position:
                vec[position[t]] = 1.0
        site = r.get(site_col) if site_col else None
        out.append(LabelRow(n, image, vec, site or None))
    return LabelTable("chestxray14", order, out, bad)


def parse_chexpert(
    path: Path,
    header: list[str],
    rows: list[dict[str, str]],
    *,
    uncertain: str = "zeros",
    blank: str = "zeros",
    findings: list[str] | None = None,
) -> LabelTable:
    """Parse CheXpert rows with the uncertain / blank policies of the module docstring."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise InputError(f"uncertain: expected one of {UNCERTAIN_POLICIES}, got {uncertain!r}")
    if blank not in BLANK_POLICIES:
        raise InputError(f"blank: expected one of {BLANK_POLICIES}, got {blank!r}")
    path_col = _column(header, "Path")
    if path_col is None:
        raise InputError(f"{path}: missing column 'Path' (CheXpert layout)")
    site_col = _site_column(header)
    label_cols = [h for h in header if h.lower() not in CHEXPERT_META and h != site_col and h]
    if findings is not None:
        absent = [f for f in findings if f not in label_cols]
        if absent:
            raise InputError(f"{path}: missing label column {absent[0]!r}")
        label_cols = list(findings)
    if not label_cols:
        raise InputError(f"{path}: missing label columns (CheXpert layout has one per finding)")
    value_of = {
        "1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0,
        "-1": {"zeros": 0.0, "ones": 1.0, "ignore": np.nan}[uncertain],
        "": 0.0 if blank == "zeros" else np.nan,
    }  # fmt: skip
    value_of["-1.0"] = value_of["-1"]
    out: list[LabelRow] = []
    bad: list[tuple[int, str, str]] = []
    for n, r in enumerate(rows, start=1):
        image = r.get(path_col, "")
        if not image:
            bad.append((n, image, f"empty {path_col!r}"))
            continue
        vec = np.empty(len(label_cols), dtype=np.float32)
        for j, col in enumerate(label_cols):
            raw = r.get(col, "")
            if raw not in value_of:
                bad.append((n, image, f"{col!r} value {raw!r} not in 1/0/-1/blank"))
                break
            vec[j] = value_of[raw]
        else:
            site = r.get(site_col) if site_col else None
            out.append(LabelRow(n, image, vec, site or None))
    return LabelTable("chexpert", label_cols, out, bad)
