"""Run report: per-site and pooled AUROC per round, privacy spent, baselines; JSON + MD + HTML.

``build_report`` reads only completed rounds from RUN_DIR, so an interrupted run can never
report a half-written round. ``report.json`` (format ``privmed-federated-report`` v1)::

    {"format", "version", "status": {"state", "message"}, "config": {flat config},
     "rounds": [{"round", "pooled_auroc_macro", "pooled_auroc": [...],
                 "sites": {site: {"auroc_macro", "auroc": [...], "n_test"}},
                 "privacy": {site: {"epsilon", "delta", "noise_multiplier",
                                    "max_grad_norm", "sample_rate", "steps"}} | null,
                 "seconds"}],
     "final": {"round", "pooled_auroc_macro", "sites": {site: auroc_macro}},
     "privacy": {site: {..., "budget"}} | null,
     "baselines": {"central": {...}, "local_only": {...}} | null,
     "model": {"onnx", "sha256", "input_shape"} | null}
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
from pathlib import Path
from typing import Any

from privmed.federated.checkpoint import RunDir, atomic_write_bytes, atomic_write_json
from privmed.federated.config import FederatedConfig

__all__ = ["build_report", "privacy_line", "round_line", "write_report"]

FORMAT = "privmed-federated-report"
CURVES = "curves.png"
_DP_KEYS = ("epsilon", "delta", "noise_multiplier", "max_grad_norm", "sample_rate", "steps")


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.{digits}f}"


def _round_privacy(metrics: dict[str, Any]) -> dict[str, dict[str, float]] | None:
    out = {}
    for site, fit in metrics.get("fit", {}).items():
        if "dp-epsilon" in fit:
            out[site] = {k: fit[f"dp-{k.replace('_', '-')}"] for k in _DP_KEYS}
    return out or None


def privacy_line(site: str, p: dict[str, Any]) -> str:
    return (
        f"{site}: epsilon={p['epsilon']:.3f} delta={p['delta']:g} noise_multiplier="
        f"{p['noise_multiplier']:.3f} clipping_norm={p['max_grad_norm']:g} sample_rate="
        f"{p['sample_rate']:.4f} steps={int(p['steps'])}"
    )


def round_line(metrics: dict[str, Any]) -> str:
    """One progress line per completed round (with the DP numbers of every site)."""
    sites = metrics.get("evaluation", {})
    parts = [
        f"round {metrics.get('round')}: pooled AUROC {_fmt(metrics.get('pooled_auroc_macro'))}",
        " ".join(f"{s} {_fmt(v.get('auroc_macro'))}" for s, v in sorted(sites.items())),
        f"{metrics.get('seconds', 0.0):.1f} s",
    ]
    privacy = _round_privacy(metrics)
    if privacy:
        parts.append("DP " + "; ".join(privacy_line(s, p) for s, p in sorted(privacy.items())))
    return " | ".join(parts)


def build_report(
    run_dir: RunDir,
    config: FederatedConfig,
    *,
    baselines: dict[str, Any] | None = None,
    onnx_path: Path | None = None,
) -> dict[str, Any]:
    """The report of everything completed in ``run_dir`` (see module docstring)."""
    rounds = []
    for m in run_dir.round_metrics():
        rounds.append({
            "round": m["round"],
            "pooled_auroc_macro": m.get("pooled_auroc_macro"),
            "pooled_auroc": m.get("pooled_auroc"),
            "sites": {s: {"auroc_macro": v.get("auroc_macro"), "auroc": v.get("auroc"), "n_test": v.get("n_test")}
                      for s, v in sorted(m.get("evaluation", {}).items())},
            "n_train": {s: f.get("n-train") for s, f in sorted(m.get("fit", {}).items())},
            "privacy": _round_privacy(m),
            "seconds": m.get("seconds"),
        })  # fmt: skip
    final = None
    if rounds:
        last = rounds[-1]
        final = {
            "round": last["round"],
            "pooled_auroc_macro": last["pooled_auroc_macro"],
            "pooled_auroc": last["pooled_auroc"],
            "sites": {s: v["auroc_macro"] for s, v in last["sites"].items()},
        }
    privacy = None
    if config.dp is not None:
        privacy = {}
        for r in rounds:  # the latest numbers each site reported
            for site, p in (r["privacy"] or {}).items():
                privacy[site] = {**p, "budget": config.dp.epsilon}
    model = None
    if onnx_path is not None and onnx_path.exists():
        model = {
            "onnx": onnx_path.name,
            "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
            "input_shape": [1, 1, config.image_size, config.image_size],
        }
    status = run_dir.status()
    return {
        "format": FORMAT,
        "version": 1,
        "status": {"state": status.get("state"), "message": status.get("message", "")},
        "config": config.to_flat(),
        "labels": list(config.labels),
        "rounds": rounds,
        "final": final,
        "privacy": privacy,
        "baselines": baselines,
        "model": model,
    }


def _markdown(report: dict[str, Any]) -> str:
    cfg = report["config"]
    sites = sorted(report["final"]["sites"]) if report["final"] else []
    lines = [
        f"# Federated run `{cfg['run-name']}`",
        "",
        f"Status: **{report['status']['state']}** {report['status']['message']}".rstrip(),
        "",
        f"Recipe {cfg.get('recipe', 'end-to-end')} (trains {cfg.get('train-params', 'all')} parameters);"
        f" model {cfg['model']} ({cfg['norm']} norm), {cfg['image-size']}x{cfg['image-size']},"
        f" {len(report['rounds'])}/{cfg['rounds']} rounds x {cfg['local-epochs']} local epoch(s),"
        f" batch {cfg['batch-size']}, lr {cfg['lr']}; SecAgg+ {'on' if cfg['secagg'] else 'off'};"
        f" DP {'on' if cfg['dp'] else 'off'}. Labels: {', '.join(report['labels'])}.",
        "",
        "## AUROC per round (macro over findings; pooled = all sites' test images)",
        "",
        "| round | pooled | " + " | ".join(sites) + " |",
        "|---|---|" + "---|" * len(sites),
    ]
    for r in report["rounds"]:
        lines.append(
            f"| {r['round']} | {_fmt(r['pooled_auroc_macro'])} | "
            + " | ".join(_fmt(r["sites"].get(s, {}).get("auroc_macro")) for s in sites) + " |"
        )
    if report["rounds"]:
        lines += ["", f"![AUROC and privacy spent per round]({CURVES})"]
    if report["privacy"]:
        lines += ["", "## Privacy spent (per site, whole run)", ""]
        lines += [f"- {privacy_line(s, p)} (budget {p['budget']:g})" for s, p in sorted(report["privacy"].items())]
    if report["baselines"]:
        lines += ["", "## Federated vs baselines (final AUROC, macro)", "",
                  "| method | pooled | " + " | ".join(sites) + " |", "|---|---|" + "---|" * len(sites)]
        if report["final"]:
            label = "federated" + (" + SecAgg+" if cfg["secagg"] else "") + (f" + DP (eps {cfg['dp-epsilon']:g})" if cfg["dp"] else "")
            lines.append(f"| {label} | {_fmt(report['final']['pooled_auroc_macro'])} | "
                         + " | ".join(_fmt(report["final"]["sites"].get(s)) for s in sites) + " |")
        for name, b in report["baselines"].items():
            lines.append(f"| {name.replace('_', '-')} | {_fmt(b.get('pooled_auroc_macro'))} | "
                         + " | ".join(_fmt(b.get("sites", {}).get(s)) for s in sites) + " |")
    if report["model"]:
        lines += ["", f"Final model: `{report['model']['onnx']}` (sha256 {report['model']['sha256'][:16]}...)"]
    return "\n".join(lines) + "\n"


def plot_rounds(report: dict[str, Any]) -> bytes:
    """PNG: AUROC per round (pooled, per site, baselines) and, with DP, epsilon spent per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    dp = any(r.get("privacy") for r in rounds)
    fig, axes = plt.subplots(1, 2 if dp else 1, figsize=(11 if dp else 6, 3.8), squeeze=False, constrained_layout=True)
    ax = axes[0, 0]
    xs = [r["round"] for r in rounds]
    ax.plot(xs, [r["pooled_auroc_macro"] for r in rounds], marker="o", linewidth=2, label="pooled")
    for site in sorted({s for r in rounds for s in r["sites"]}):
        ax.plot(xs, [r["sites"].get(site, {}).get("auroc_macro") for r in rounds], linewidth=1, alpha=0.6, label=site)
    for (name, b), style in zip((report.get("baselines") or {}).items(), ("--", ":"), strict=False):
        if b.get("pooled_auroc_macro") is not None:
            ax.axhline(b["pooled_auroc_macro"], color="grey", linestyle=style, label=f"{name.replace('_', '-')} baseline")
    ax.set_xlabel("round")
    ax.set_ylabel("AUROC (macro over findings)")
    ax.legend(fontsize=7)
    if dp:
        ax = axes[0, 1]
        budget = (report.get("privacy") or {})
        for site in sorted({s for r in rounds for s in (r.get("privacy") or {})}):
            ax.plot(xs, [(r.get("privacy") or {}).get(site, {}).get("epsilon") for r in rounds], marker=".", label=site)
        for value in sorted({p["budget"] for p in budget.values() if p.get("budget") is not None}):
            ax.axhline(value, color="red", linestyle="--", label=f"budget {value:g}")
        ax.set_xlabel("round")
        ax.set_ylabel(f"epsilon spent (delta {report['config'].get('dp-delta', 'n/a')})")
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _html(markdown: str, images: dict[str, bytes] | None = None) -> str:
    """Self-contained HTML rendering of the Markdown report (tables, lists, headings, and
    ``![alt](name)`` lines whose ``name`` is in ``images``, embedded as base64 PNG)."""
    body, in_table = [], False
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [html.escape(c.strip()) for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                body.append("<table>")
                in_table = True
            body.append("<tr>" + "".join(f"<{tag}>{c}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            body.append("</table>")
            in_table = False
        text = html.escape(line).replace("**", "")
        if line.startswith("![") and line.endswith(")") and "](" in line:
            alt, name = line[2:-1].split("](", 1)
            if images and name in images:
                data = base64.b64encode(images[name]).decode("ascii")
                body.append(f"<p><img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'></p>")
        elif line.startswith("# "):
            body.append(f"<h1>{text[2:]}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("- "):
            body.append(f"<li>{text[2:]}</li>")
        elif line:
            body.append(f"<p>{text}</p>")
    if in_table:
        body.append("</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #999;padding:2px 8px;text-align:right}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>privmed federated report</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def write_report(run_dir: RunDir, report: dict[str, Any]) -> dict[str, Path]:
    """Write report.json, report.md, curves.png and report.html atomically; return their paths."""
    paths = {"json": run_dir.root / "report.json", "md": run_dir.root / "report.md",
             "html": run_dir.root / "report.html"}
    markdown = _markdown(report)
    images = {}
    if report["rounds"]:
        images[CURVES] = plot_rounds(report)
        paths["curves"] = run_dir.root / CURVES
        atomic_write_bytes(paths["curves"], images[CURVES])
    atomic_write_json(paths["json"], report)
    atomic_write_bytes(paths["md"], markdown.encode("utf-8"))
    atomic_write_bytes(paths["html"], _html(markdown, images).encode("utf-8"))
    return paths
