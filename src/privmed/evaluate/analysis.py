"""From stored per-image results to every number of the report (a JSON-ready dict).

:func:`load_arrays` turns the rows of a results database into aligned arrays;
:func:`summarize_study` computes per finding (pooled and per site) the AUROCs with DeLong CIs,
the paired DeLong test, KS, TOST, absolute differences, label agreement and Bland-Altman
limits; Dice/HD95 when the outputs are masks; and the cost summaries. The report renders
only numbers found in this dict, so ``summary.json`` holds everything the page shows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from privmed.evaluate.costs import projected_study_seconds, summarize
from privmed.evaluate.equivalence import (
    abs_difference,
    bland_altman,
    ks_two_sample,
    label_agreement,
    tost_paired,
)
from privmed.evaluate.masks import dice, hd95
from privmed.evaluate.roc import auroc, delong_paired
from privmed.evaluate.store import ImageResult

ALPHA = 0.05


@dataclass
class StudyArrays:
    """Successful images of a study, aligned: row i of every array is the same image.

    ``plain``/``secure`` are probabilities (sigmoid applied when the model outputs logits):
    ``(n, F)`` for classifiers, ``(n, C, *spatial)`` for segmentation models.
    """

    findings: list[str]
    sites: np.ndarray
    image_ids: np.ndarray
    labels: np.ndarray
    plain: np.ndarray
    secure: np.ndarray
    is_mask: bool
    truth: np.ndarray | None = None


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -60.0, 60.0)))


def load_arrays(rows: list[ImageResult], meta: dict[str, Any]) -> StudyArrays:
    """Stack the ``ok`` rows; apply the sigmoid if ``meta["output_kind"] == "logit"``."""
    findings = list(meta.get("findings", []))
    ok = [
        r
        for r in rows
        if r.status == "ok" and r.plain_output is not None and r.secure_output is not None
    ]
    if not ok:
        empty = np.zeros((0, len(findings)))
        return StudyArrays(
            findings, np.array([], str), np.array([], str), empty, empty, empty, False
        )
    plain = np.stack([np.asarray(r.plain_output, np.float64)[0] for r in ok])
    secure = np.stack([np.asarray(r.secure_output, np.float64)[0] for r in ok])
    if meta.get("output_kind") == "logit":
        plain, secure = _sigmoid(plain), _sigmoid(secure)
    nan_labels = np.full(len(findings), np.nan)
    labels = np.stack([r.labels if r.labels is not None else nan_labels for r in ok]).astype(
        np.float64
    )
    truth = None
    if plain.ndim > 2 and all(r.truth_mask is not None for r in ok):
        truth = np.stack([np.asarray(r.truth_mask) for r in ok])
    return StudyArrays(
        truth=truth,
        findings=findings,
        sites=np.array([r.site for r in ok]),
        image_ids=np.array([r.image_id for r in ok]),
        labels=labels,
        plain=plain,
        secure=secure,
        is_mask=plain.ndim > 2,
    )


def finding_stats(labels: np.ndarray, plain: np.ndarray, secure: np.ndarray, margin: float,
                  threshold: float) -> dict[str, Any]:  # fmt: skip
    """All secure-vs-plaintext statistics of one output column on one set of images."""
    out: dict[str, Any] = {"n": int(plain.size), "n_labelled": int(np.sum(~np.isnan(labels)))}
    out["auroc_plain"] = asdict(auroc(labels, plain, ALPHA))
    out["auroc_secure"] = asdict(auroc(labels, secure, ALPHA))
    out["n_pos"], out["n_neg"] = out["auroc_plain"]["n_pos"], out["auroc_plain"]["n_neg"]
    out["delong"] = asdict(delong_paired(labels, plain, secure, ALPHA))
    if plain.size == 0:
        return out
    out["ks"] = asdict(ks_two_sample(secure, plain))
    out["tost"] = asdict(tost_paired(secure, plain, margin, ALPHA))
    out["abs_diff"] = asdict(abs_difference(secure, plain))
    out["agreement"] = asdict(label_agreement(secure, plain, threshold))
    bias, lo, hi = bland_altman(secure, plain)
    out["bland_altman"] = {"bias": bias, "lo": lo, "hi": hi}
    return out


def format_p(p: float | None) -> str:
    """``p = 0.83`` style, ``p < 0.001`` below one in a thousand, ``p = n/a`` if undefined."""
    if p is None or not math.isfinite(p):
        return "p = n/a"
    if p < 0.001:
        return "p < 0.001"
    return f"p = {p:.3f}" if p < 0.01 else f"p = {p:.2f}"


def sentence(name: str, s: dict[str, Any], margin: float) -> str:
    """One plain-language line for a finding, e.g. for a clinician reading the report."""
    parts: list[str] = []
    d = s.get("delong", {})
    ap, asec = s["auroc_plain"]["auc"], s["auroc_secure"]["auc"]
    if ap is None or asec is None or not (math.isfinite(ap) and math.isfinite(asec)):
        parts.append(
            f"AUROC not computable ({s['n_pos']} positive, {s['n_neg']} negative labelled cases)"
        )
    elif d.get("p") is None or not math.isfinite(d["p"]):
        parts.append(
            f"AUROC {ap:.3f} plaintext vs {asec:.3f} secure (too few cases for DeLong's test)"
        )
    elif d["p"] < ALPHA:
        parts.append(
            f"AUROC differs significantly ({ap:.3f} plaintext vs {asec:.3f} secure, DeLong {format_p(d['p'])})"
        )
    else:
        parts.append(
            f"no significant difference in AUROC ({ap:.3f} vs {asec:.3f}, DeLong {format_p(d['p'])})"
        )
    if "tost" in s:
        t = s["tost"]
        if t["equivalent"]:
            parts.append(f"outputs equivalent within ±{margin:g} (TOST {format_p(t['p'])})")
        else:
            parts.append(f"equivalence within ±{margin:g} not shown (TOST {format_p(t['p'])})")
        parts.append(f"max |secure − plaintext| = {s['abs_diff']['max_abs']:.2g}")
        a = s["agreement"]
        parts.append(f"{100 * a['rate']:.1f}% of labels agree at threshold {a['threshold']:g}")
    return f"{name}: " + "; ".join(parts) + "."


def _label_maps(prob: np.ndarray, threshold: float) -> np.ndarray:
    """(n, C, *spatial) probabilities -> (n, *spatial) labels: threshold if C = 1, else argmax."""
    if prob.shape[1] == 1:
        return (prob[:, 0] >= threshold).astype(np.int64)
    return np.argmax(prob, axis=1)


def compare_masks(
    a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...] | None = None
) -> dict[str, Any]:
    """Dice and HD95 between paired binary masks ``a[i]``, ``b[i]`` over n images.

    HD95 is summarised over images where both masks are non-empty; images where exactly one
    is empty (HD95 infinite) are counted in ``n_one_empty`` instead.
    """
    dices = np.array([dice(x, y) for x, y in zip(a, b, strict=True)])
    both = [(x, y) for x, y in zip(a, b, strict=True) if x.any() and y.any()]
    one_empty = sum(1 for x, y in zip(a, b, strict=True) if bool(x.any()) != bool(y.any()))
    hds = np.array([hd95(x, y, spacing) for x, y in both])
    return {"dice": {**asdict(summarize(dices)), "min": float(dices.min()) if dices.size else None},
            "hd95": asdict(summarize(hds)), "n_one_empty": int(one_empty)}  # fmt: skip


def _mask_stats(arrays: StudyArrays, threshold: float) -> dict[str, Any]:
    """Per class: secure vs plaintext masks, and both vs ground truth when it was stored.

    Classes are 1..C-1 of the argmax label map for C > 1 output channels (channel 0 is the
    background) and the thresholded single channel for C = 1. Distances are in output voxels.
    """
    n_channels = arrays.plain.shape[1]
    plain, secure = _label_maps(arrays.plain, threshold), _label_maps(arrays.secure, threshold)
    out: dict[str, Any] = {}
    for c in [1] if n_channels == 1 else range(1, n_channels):
        if len(arrays.findings) == max(1, n_channels - 1):
            name = arrays.findings[c - 1]
        else:
            name = f"class {c}"
        entry: dict[str, Any] = {
            "voxel_agreement": float(np.mean((plain == c) == (secure == c))),
            "secure_vs_plain": compare_masks(secure == c, plain == c),
            "secure_vs_truth": None,
            "plain_vs_truth": None,
        }
        if arrays.truth is not None:
            truth = arrays.truth == c
            entry["secure_vs_truth"] = compare_masks(secure == c, truth)
            entry["plain_vs_truth"] = compare_masks(plain == c, truth)
        out[name] = entry
    return out


def cost_stats(rows: list[ImageResult], n_study: int, workers: int) -> dict[str, Any]:
    """Per-image costs (median, IQR, max) and projected time for the whole study.

    ``offline_s`` / ``offline_bytes`` / ``online_bytes`` count only the images whose engine
    reported its phases apart (two parties; ``n`` = 0 for a dealer-mode or older study).
    """
    ok = [r for r in rows if r.status == "ok"]
    roles = sorted(
        {k for r in ok for k in r.bytes_by_role} | {k for r in ok for k in r.peak_rss_mb}
    )

    def col(get: Any) -> np.ndarray:
        return np.array(
            [np.nan if (v := get(r)) is None else float(v) for r in ok], dtype=np.float64
        )

    secure_s = col(lambda r: r.secure_s)
    runs: dict[str, list[ImageResult]] = {}
    for r in ok:
        runs.setdefault(r.run_id, []).append(r)
    # Throughput per run (started to last finished), so pauses between resumed runs don't count.
    span = sum(
        max(r.finished_at for r in rs) - min(r.started_at for r in rs) for rs in runs.values()
    )
    return {
        "n_images": len(ok),
        "secure_s": asdict(summarize(secure_s)),
        "plain_s": asdict(summarize(col(lambda r: r.plain_s))),
        "online_s": asdict(summarize(col(lambda r: r.online_s))),
        "offline_s": asdict(summarize(col(lambda r: r.offline_s))),
        "bytes_total": asdict(summarize(col(lambda r: sum(r.bytes_by_role.values()) if r.bytes_by_role else None))),
        "offline_bytes": asdict(summarize(col(lambda r: r.offline_bytes))),
        "online_bytes": asdict(summarize(col(lambda r: r.online_bytes))),
        "rounds": asdict(summarize(col(lambda r: r.rounds))),
        "session_images": asdict(summarize(col(lambda r: r.session_images))),
        "bytes_by_role": {k: asdict(summarize(col(lambda r, k=k: r.bytes_by_role.get(k)))) for k in roles},
        "peak_rss_mb": {k: asdict(summarize(col(lambda r, k=k: r.peak_rss_mb.get(k)))) for k in roles},
        "cpu_s": {k: asdict(summarize(col(lambda r, k=k: r.cpu_s.get(k)))) for k in roles
                  if any(k in r.cpu_s for r in ok)},
        "workers": workers,
        "n_images_study": n_study,
        "observed_s_per_image": span / len(ok) if ok and span > 0 else None,
        "projected_study_s": (span / len(ok) * n_study) if ok and span > 0
        else projected_study_seconds(secure_s, n_study, max(1, workers)),
    }  # fmt: skip


def summarize_study(rows: list[ImageResult], meta: dict[str, Any], *, margin: float | None = None,
                    threshold: float | None = None) -> tuple[dict[str, Any], StudyArrays]:  # fmt: skip
    """Every number of the report, plus the arrays the plots need."""
    margin = float(margin if margin is not None else meta.get("margin", 0.01))
    threshold = float(threshold if threshold is not None else meta.get("threshold", 0.5))
    arrays = load_arrays(rows, meta)
    errors = [
        {"site": r.site, "image_id": r.image_id, "error": r.error} for r in rows if r.status != "ok"
    ]
    sites = sorted(set(arrays.sites.tolist()) | {e["site"] for e in errors})
    summary: dict[str, Any] = {
        "study": {
            "model_path": meta.get("model_path"), "model_sha256": meta.get("model_sha256"),
            "data_dir": meta.get("data_dir"), "findings": arrays.findings,
            "output_kind": meta.get("output_kind"), "n_images_study": meta.get("n_images_study"),
            "n_stored": len(rows), "n_ok": int(arrays.plain.shape[0]), "n_error": len(errors),
            "sites": sites, "margin": margin, "threshold": threshold, "alpha": ALPHA,
            "n_per_site": {s: int(np.sum(arrays.sites == s)) for s in sites},
        },
        "findings": [],
        "masks": None,
        "costs": cost_stats(rows, int(meta.get("n_images_study") or len(rows)), int(meta.get("workers", 1))),
        "errors": errors,
        "data_skipped": meta.get("data_skipped", []),
    }  # fmt: skip
    if arrays.plain.size:
        ba_bias, ba_lo, ba_hi = bland_altman(arrays.secure, arrays.plain)
        summary["all_outputs"] = {
            "abs_diff": asdict(abs_difference(arrays.secure, arrays.plain)),
            "bland_altman": {"bias": ba_bias, "lo": ba_lo, "hi": ba_hi},
        }
    else:
        summary["all_outputs"] = {"abs_diff": None, "bland_altman": None}
    if arrays.is_mask:
        summary["masks"] = _mask_stats(arrays, threshold)
        return summary, arrays
    for j, name in enumerate(arrays.findings):
        pooled = finding_stats(
            arrays.labels[:, j], arrays.plain[:, j], arrays.secure[:, j], margin, threshold
        )
        per_site = {}
        for s in sites:
            m = arrays.sites == s
            if m.any():
                per_site[s] = finding_stats(arrays.labels[m, j], arrays.plain[m, j], arrays.secure[m, j],
                                            margin, threshold)  # fmt: skip
        summary["findings"].append({"finding": name, "pooled": pooled, "sites": per_site,
                                    "sentence": sentence(name, pooled, margin)})  # fmt: skip
    return summary, arrays


def json_ready(obj: Any) -> Any:
    """Replace NaN/inf by None and numpy scalars by Python numbers, recursively."""
    if isinstance(obj, dict):
        return {str(k): json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    return obj
