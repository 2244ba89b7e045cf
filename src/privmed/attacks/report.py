"""Attack report: leakage curves beside the AUROC cost of each defence; JSON + Markdown + HTML.

Inputs are ``ATTACK_DIR/attack.json`` (``experiment.run_attack``) and, optionally, any
number of ``privmed federate`` run reports (``report.json``, format
``privmed-federated-report`` v1). From each run we take: SecAgg+ on/off, DP on/off, the
largest per-site noise multiplier and epsilon, the final pooled macro AUROC, and the central
baseline's AUROC. The AUROC cost of a DP run is measured against a run without DP when one
is given, otherwise against the central baseline in the same report.

Outputs in ATTACK_DIR: ``attack.json`` (with a ``federate`` section added),
``curves.png``, ``report.md`` and a self-contained ``report.html`` (figures embedded).
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from privmed.attacks.experiment import json_safe
from privmed.errors import InputError

FEDERATE_FORMAT = "privmed-federated-report"

THREATS = (
    "Secure aggregation (SecAgg+) hides each site's single update from an honest-but-curious "
    "server: the server sees only the weighted mean over the sites, so an inversion must "
    "explain every site's images at once. It does nothing against anyone who sees the "
    "aggregate or the final model, and nothing if the server colludes with all sites but one "
    "or if only one site takes part. Only differential privacy (DP-SGD: per-sample clipping "
    "plus Gaussian noise, added by each site before anything leaves it) bounds what a single "
    "update, the aggregate and the final model reveal about any one patient, at the AUROC "
    "cost shown beside it."
)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


def read_federate_report(path: str | Path) -> dict[str, Any]:
    """The defence and AUROC numbers of one ``privmed federate`` report (see module doc)."""
    source = Path(path)
    try:
        body = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{source}: cannot read a federate report: {exc}") from None
    if not isinstance(body, dict) or body.get("format") != FEDERATE_FORMAT:
        raise InputError(f"{source}: expected format {FEDERATE_FORMAT!r}, got {body.get('format') if isinstance(body, dict) else type(body).__name__}")
    config = body.get("config") or {}
    privacy = body.get("privacy") or {}
    sigmas = [_number(p.get("noise_multiplier")) for p in privacy.values()]
    epsilons = [_number(p.get("epsilon")) for p in privacy.values()]
    central = ((body.get("baselines") or {}).get("central") or {})
    return {
        "path": str(source),
        "model": config.get("model"),
        "secagg": bool(config.get("secagg")),
        "dp": bool(config.get("dp")),
        "noise_multiplier": max((s for s in sigmas if s is not None), default=None),
        "epsilon": max((e for e in epsilons if e is not None), default=None),
        "auroc": _number((body.get("final") or {}).get("pooled_auroc_macro")),
        "central_auroc": _number(central.get("pooled_auroc_macro")),
    }


def auroc_costs(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``reference`` and ``auroc_cost`` (reference AUROC - run AUROC) to each run."""
    plain = [r for r in runs if not r["dp"] and r["auroc"] is not None]
    out = []
    for run in runs:
        reference, what = None, None
        if run["dp"] and plain:
            reference, what = max(r["auroc"] for r in plain), "federated without DP"
        elif run["central_auroc"] is not None:
            reference, what = run["central_auroc"], "central baseline"
        cost = reference - run["auroc"] if reference is not None and run["auroc"] is not None else None
        out.append({**run, "reference": what, "reference_auroc": reference, "auroc_cost": cost})
    return out


def _metric(summary: dict[str, Any], metric: str) -> float | None:
    """``leakage`` as stored, or ``residual_excess``: residual correlation minus its site-mean guess."""
    if metric == "residual_excess":
        a, b = _number(summary.get("residual_correlation")), _number(summary.get("residual_correlation_site_mean"))
        return a - b if a is not None and b is not None else None
    return _number(summary.get(metric))


def _series(
    configs: Sequence[dict[str, Any]], axis: str, fixed: Sequence[str], metric: str = "leakage"
) -> dict[tuple, list[tuple[float, float]]]:
    lines: dict[tuple, list[tuple[float, float]]] = {}
    for c in configs:
        value = _metric(c["summary"], metric)
        if value is None:
            continue
        lines.setdefault(tuple(c[k] for k in fixed), []).append((float(c[axis]), value))
    return {k: sorted(v) for k, v in lines.items()}


METRICS = (
    ("leakage", "SSIM leakage vs mean image"),
    ("residual_excess", "residual corr. minus site-mean guess"),
)


def plot_curves(body: dict[str, Any], path: Path) -> Path:
    """Leakage vs batch size, vs DP noise (with AUROC cost), vs aggregated sites.

    Top row: the SSIM leakage score; bottom row: residual correlation minus what the
    attacked site's mean image gets (above 0 = patient-specific detail recovered).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = body["configurations"]
    axes_spec = [
        ("batch_size", ("dp_sigma", "secagg_sites"), "batch size", lambda k: f"sigma {k[0]:g}, sites {k[1]}"),
        ("dp_sigma", ("batch_size", "secagg_sites"), "DP noise multiplier sigma", lambda k: f"batch {k[0]}, sites {k[1]}"),
        ("secagg_sites", ("batch_size", "dp_sigma"), "sites in the secure aggregate", lambda k: f"batch {k[0]}, sigma {k[1]:g}"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(14, 8), constrained_layout=True)
    for row, (metric, ylabel) in enumerate(METRICS):
        for ax, (axis, fixed, label, name) in zip(axes[row], axes_spec, strict=True):
            for key, points in sorted(_series(configs, axis, fixed, metric).items()):
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=name(key))
            ax.axhline(0.0, color="grey", linestyle="--", linewidth=1)
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            if axis == "batch_size":
                ax.set_xscale("log", base=2)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    runs = [r for r in body.get("federate") or [] if r["dp"] and r["auroc_cost"] is not None]
    if runs:
        for row in range(len(METRICS)):
            twin = axes[row, 1].twinx()
            costs = [r["auroc_cost"] for r in runs]
            twin.plot([r["noise_multiplier"] for r in runs], costs, "k^", markersize=9, label="AUROC cost of DP")
            twin.set_ylim(0, max(0.05, 1.25 * max(costs)))
            twin.set_ylabel("AUROC cost of DP (privmed federate runs)")
            twin.legend(loc="center right", fontsize=7)
    fig.suptitle("Gradient-inversion leakage per defence (0 = no better than a guess without the update)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_error(value: Any) -> str:
    """Relative errors span 1e-7 (exact recovery) to ~1 (nothing): two significant digits."""
    if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return "n/a"
    return f"{float(value):.1e}" if value < 0.01 else f"{float(value):.2f}"


def config_table(configs: Sequence[dict[str, Any]]) -> list[list[str]]:
    """Header row plus one row per configuration."""
    rows = [["batch", "DP sigma", "epsilon (1 round)", "sites", "PSNR dB", "SSIM", "SSIM prior", "leakage", "residual corr.", "site-mean corr.", "label counts", "features err.", "seconds"]]
    for c in configs:
        s = c["summary"]
        rows.append([
            str(c["batch_size"]), f"{c['dp_sigma']:g}", _fmt(c["epsilon_round"], 1), str(c["secagg_sites"]),
            _fmt(s["psnr"], 1), _fmt(s["ssim"]), _fmt(s["ssim_prior"]), _fmt(s["leakage"]),
            _fmt(s.get("residual_correlation")), _fmt(s.get("residual_correlation_site_mean")),
            _fmt(c["label_count_accuracy"], 2),
            _fmt_error(c.get("head_input_error")), _fmt(c["seconds"], 0),
        ])
    return rows


def federate_table(runs: Sequence[dict[str, Any]]) -> list[list[str]]:
    rows = [["run", "SecAgg+", "DP", "sigma", "epsilon", "AUROC", "reference", "AUROC cost"]]
    for r in runs:
        rows.append([
            r["path"], "on" if r["secagg"] else "off", "on" if r["dp"] else "off", _fmt(r["noise_multiplier"]),
            _fmt(r["epsilon"], 2), _fmt(r["auroc"]), f"{r['reference'] or 'n/a'} {_fmt(r['reference_auroc'])}",
            _fmt(r["auroc_cost"]),
        ])
    return rows


def _markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def _html_table(rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def _intro(body: dict[str, Any]) -> str:
    plan = body["plan"]
    inv = plan["inversion"]
    return (
        f"Model {plan['model']} (norm {plan['norm']}, {plan['image_size']}x{plan['image_size']}), "
        f"{plan['local_steps']} local step(s) of SGD at lr {plan['lr']:g}, DP clipping norm {plan['clip_norm']:g}; "
        f"labels {'given to the attacker' if plan['known_labels'] else 'recovered from the update'}; inversion: "
        f"{inv['iterations']} iterations x {inv['restarts']} restarts, TV weight {inv['tv_weight']:g}, scales {inv['scales']}"
        f", init {inv.get('init', 'uniform')}, prior weight {inv.get('prior_weight', 0):g}. "
        f"Prior: mean of {body['prior']['n_images']} held-out images. Leakage = (SSIM(rec) - SSIM(prior)) / SSIM(prior): "
        "0 means the update taught the attacker nothing beyond the mean image, negative means the "
        "reconstruction is worse than that guess. Residual corr. = correlation of (rec - prior) with "
        "(image - prior): how much of what makes this patient differ from the mean was recovered "
        "(0 = nothing, 1 = all); site-mean corr. = the same for the attacked site's own mean "
        "image, a guess that needs no update: only residual correlation above it is "
        "patient-specific. Features err. = relative L2 error of the image's penultimate "
        "features (the head's input) read directly off the head's update, without optimisation, "
        "against the closest attacked image: near 0 means the server has that feature vector exactly."
    )


def write_report(
    out_dir: str | Path, federate_reports: Sequence[str | Path] = ()
) -> dict[str, Path]:
    """Read ``out_dir/attack.json``, add the federate runs, write curves + MD + HTML."""
    out = Path(out_dir)
    source = out / "attack.json"
    try:
        body = json.loads(source.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{source}: cannot read attack results: {exc}") from None
    if federate_reports:
        body["federate"] = auroc_costs([read_federate_report(p) for p in federate_reports])
    configs = body.get("configurations") or []
    if not configs:
        raise InputError(f"{source}: no finished configurations to report")
    curves = plot_curves(body, out / "curves.png")
    source.write_text(json.dumps(json_safe(body), indent=1, allow_nan=False))
    runs = body.get("federate") or []
    md = ["# privmed attack report", "", _intro(body), "", _markdown_table(config_table(configs)), ""]
    md += ["![leakage curves](curves.png)", ""]
    if runs:
        md += ["## AUROC cost of the defences (privmed federate)", "", _markdown_table(federate_table(runs)), ""]
    md += ["## What each defence addresses", "", THREATS, "", "## Ground truth | reconstruction", ""]
    md += [f"**{c['id']}**\n\n![{c['id']}]({c['grid']})\n" for c in configs]
    (out / "report.md").write_text("\n".join(md))

    def embed(path: Path) -> str:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'

    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>privmed attack report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}</style></head><body>",
        "<h1>privmed attack report</h1>", f"<p>{html.escape(_intro(body))}</p>",
        _html_table(config_table(configs)), embed(curves),
    ]
    if runs:
        parts += ["<h2>AUROC cost of the defences (privmed federate)</h2>", _html_table(federate_table(runs))]
    parts += ["<h2>What each defence addresses</h2>", f"<p>{html.escape(THREATS)}</p>", "<h2>Ground truth | reconstruction</h2>"]
    parts += [f"<h3>{html.escape(c['id'])}</h3>{embed(out / c['grid'])}" for c in configs]
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))
    return {"json": source, "md": out / "report.md", "html": out / "report.html", "curves": curves}
