"""Report figures as base64 PNG strings (matplotlib, Agg backend, no display needed)."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import numpy as np

from privmed.evaluate.analysis import StudyArrays
from privmed.evaluate.roc import roc_points

# at most this many points per scatter: beyond it the PNG grows and shows nothing new
MAX_POINTS = 20000


def _figure(width: float, height: float) -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    # Figure() directly, not pyplot: no global figure registry, safe from worker threads.
    # Fixed margins instead of constrained layout, which costs a second per figure.
    return Figure(figsize=(width, height), dpi=100)


def _png_base64(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def roc_grid(arrays: StudyArrays, summary: dict[str, Any]) -> str:
    """One panel per finding: plaintext ROC (solid) and secure ROC (dashed) with AUROCs."""
    n = max(1, len(arrays.findings))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = _figure(3.2 * cols, 3.0 * rows)
    axes = fig.subplots(rows, cols, squeeze=False)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.5 / (3.0 * rows), top=1 - 0.3 / (3.0 * rows),
                        wspace=0.3, hspace=0.45)  # fmt: skip
    by_name = {f["finding"]: f["pooled"] for f in summary["findings"]}
    for j, name in enumerate(arrays.findings):
        ax = axes[j // cols][j % cols]
        stats = by_name.get(name, {})
        for scores, label, style in (
            (arrays.plain[:, j], "plaintext", "-"),
            (arrays.secure[:, j], "secure", "--"),
        ):
            fpr, tpr = roc_points(arrays.labels[:, j], scores)
            if fpr.size == 0:
                continue
            auc = stats.get(f"auroc_{'plain' if label == 'plaintext' else 'secure'}", {}).get("auc")
            ax.plot(
                fpr,
                tpr,
                style,
                lw=1.6,
                label=f"{label} AUROC {auc:.3f}" if auc is not None else label,
            )
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("1 − specificity", fontsize=8)
        ax.set_ylabel("sensitivity", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    return _png_base64(fig)


def _pairs(arrays: StudyArrays) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, plain, secure) per output column, subsampled with a fixed stride if huge."""
    out = []
    for j in range(arrays.plain.shape[1]):
        p = arrays.plain[:, j].ravel()
        s = arrays.secure[:, j].ravel()
        step = max(1, p.size * arrays.plain.shape[1] // MAX_POINTS)
        name = arrays.findings[j] if j < len(arrays.findings) else f"channel {j}"
        out.append((name, p[::step], s[::step]))
    return out


def scatter(arrays: StudyArrays) -> str:
    """Secure against plaintext output for every image and finding, with the identity line."""
    fig = _figure(5.0, 4.6)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.11, top=0.93)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, label="identity", zorder=1)
    for name, p, s in _pairs(arrays):
        ax.scatter(p, s, s=6, alpha=0.6, label=name, zorder=2)
    ax.set_xlabel("plaintext output (onnxruntime)")
    ax.set_ylabel("secure output (MPC)")
    ax.set_title("Secure vs plaintext, every image and finding", fontsize=10)
    ax.legend(fontsize=7, markerscale=2)
    return _png_base64(fig)


def bland_altman_plot(arrays: StudyArrays, all_outputs: dict[str, Any]) -> str:
    """Difference (secure − plaintext) against mean, with bias and 95% limits of agreement."""
    fig = _figure(5.6, 4.6)
    ax = fig.subplots()
    fig.subplots_adjust(left=0.14, right=0.97, bottom=0.11, top=0.93)
    for name, p, s in _pairs(arrays):
        ax.scatter((p + s) / 2.0, s - p, s=6, alpha=0.6, label=name)
    ba = all_outputs.get("bland_altman") or {}
    for key, style, text in (
        ("bias", "-", "bias"),
        ("lo", "--", "−1.96 SD"),
        ("hi", "--", "+1.96 SD"),
    ):
        value = ba.get(key)
        if value is not None:
            ax.axhline(value, color="black", ls=style, lw=0.9)
            ax.annotate(f"{text} {value:.2e}", (0.99, value), xycoords=("axes fraction", "data"),
                        ha="right", va="bottom", fontsize=7,
                        bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85})  # fmt: skip
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.set_xlabel("mean of secure and plaintext output")
    ax.set_ylabel("secure − plaintext")
    ax.set_title("Bland-Altman, every image and finding", fontsize=10)
    ax.legend(fontsize=7, markerscale=2, loc="upper left")
    return _png_base64(fig)
