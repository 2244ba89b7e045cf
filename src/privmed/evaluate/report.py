"""``report.html`` (self-contained: CSS inline, plots as base64 PNG) and ``summary.json``.

Every number on the page is read from the summary dict that is also written to
``summary.json``, so a statistician can check any figure of the report in the JSON.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from html import escape
from pathlib import Path
from typing import Any

from privmed.evaluate import plots
from privmed.evaluate.analysis import format_p, json_ready, summarize_study
from privmed.evaluate.store import ResultStore

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.json"

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:2em auto;max-width:1180px;
color:#1b1f24;line-height:1.45;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #d0d7de}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{border:1px solid #d0d7de;padding:.25em .55em;text-align:right;vertical-align:top}
th{background:#f3f5f7}td{white-space:nowrap}td.l,th.l{text-align:left;white-space:normal}
.meta td{text-align:left}.ok{color:#1a7f37}.bad{color:#cf222e}
ul.sum li{margin:.3em 0}img{max-width:100%;border:1px solid #eaecef}
.figs{display:flex;flex-wrap:wrap;gap:1em}figure{margin:0}.note{color:#57606a;font-size:.85em}
"""


def _num(x: Any, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, fmt)


def _ci(d: dict[str, Any] | None) -> str:
    if not d or d.get("auc") is None:
        return "–"
    if d.get("lo") is None:
        return _num(d["auc"])
    return f"{_num(d['auc'])} [{_num(d['lo'])}, {_num(d['hi'])}]"


def _p(p: Any) -> str:
    return escape(format_p(p).removeprefix("p = ").replace("p < ", "< "))


def _bytes(x: Any) -> str:
    if x is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= size:
            return f"{x / size:.2f} {unit}"
    return f"{x:.0f} B"


def _duration(s: Any) -> str:
    if s is None:
        return "–"
    if s < 1:
        return f"{1000 * s:.1f} ms"
    if s < 120:
        return f"{s:.2f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _row(cells: list[str], left: int = 1) -> str:
    return "<tr>" + "".join(f"<td class=l>{c}</td>" if i < left else f"<td>{c}</td>"
                            for i, c in enumerate(cells)) + "</tr>"  # fmt: skip


def _head(cells: list[str], left: int = 1) -> str:
    return "<tr>" + "".join(f"<th class=l>{escape(c)}</th>" if i < left else f"<th>{escape(c)}</th>"
                            for i, c in enumerate(cells)) + "</tr>"  # fmt: skip


def _finding_cells(s: dict[str, Any]) -> list[str]:
    d, t = s.get("delong", {}), s.get("tost")
    tost_ci = f"[{_num(t['lo'], '.1e')}, {_num(t['hi'], '.1e')}]" if t else "–"
    agree = s.get("agreement")
    return [
        str(s["n"]), f"{s['n_pos']}/{s['n_neg']}", _ci(s["auroc_plain"]), _ci(s["auroc_secure"]),
        _num(d.get("diff"), ".1e"), _p(d.get("p")),
        f"{_num(s['ks']['statistic'])} ({_p(s['ks']['p'])})" if "ks" in s else "–",
        tost_ci, _p(t["p"]) if t else "–",
        _num(s["abs_diff"]["max_abs"], ".1e") if "abs_diff" in s else "–",
        _num(s["abs_diff"]["mean_abs"], ".1e") if "abs_diff" in s else "–",
        f"{100 * agree['rate']:.1f}%" if agree else "–",
    ]  # fmt: skip


_FINDING_HEAD = ["n", "pos/neg", "AUROC plaintext [95% CI]", "AUROC secure [95% CI]", "ΔAUROC",
                 "DeLong p", "KS D (p)", "TOST 90% CI of mean Δ", "TOST p", "max |Δ|", "mean |Δ|",
                 "label agreement"]  # fmt: skip


def _cost_table(c: dict[str, Any]) -> str:
    nothing: dict[str, Any] = {}  # a summary.json written before the offline/online split
    rows = [("secure inference time per image", c["secure_s"], _duration),
            ("of which offline phase (input-independent)", c.get("offline_s", nothing), _duration),
            ("of which online phase (engine's timer)", c["online_s"], _duration),
            ("plaintext inference time per image", c["plain_s"], _duration),
            ("bytes sent per image, all roles", c["bytes_total"], _bytes),
            ("of which offline phase", c.get("offline_bytes", nothing), _bytes),
            ("of which online phase", c.get("online_bytes", nothing), _bytes),
            ("communication rounds per image", c["rounds"], lambda x: _num(x, ".0f")),
            ("images per secure session", c.get("session_images", {}), lambda x: _num(x, ".0f"))]  # fmt: skip
    rows += [(f"bytes sent by {role}", v, _bytes) for role, v in c["bytes_by_role"].items()]
    rows += [
        (f"peak memory of {role} (MB)", v, lambda x: _num(x, ".1f"))
        for role, v in c["peak_rss_mb"].items()
    ]
    rows += [(f"CPU time of {role}", v, _duration) for role, v in c.get("cpu_s", {}).items()]
    body = [_head(["cost", "median", "IQR (Q1 – Q3)", "max", "n"])]
    for label, s, fmt in rows:
        if not s.get("n"):
            continue  # not measured (e.g. an engine that does not report it)
        iqr = f"{fmt(s['q1'])} – {fmt(s['q3'])}" if s.get("q1") is not None else "–"
        body.append(_row([escape(label), fmt(s["median"]), iqr, fmt(s["max"]), str(s["n"])]))
    return "<table>" + "".join(body) + "</table>"


_PHASES_NOTE = ("Two parties: the offline phase is the input-independent work (HE products on random masks "
                "and OT material, or only the load of a set precomputed with --precompute) plus the image's "
                "share of the session's set-up (HE key, base OTs) and plan; the online phase is the walk "
                "over the plan on the image, the same for every image, so each image gets an even share "
                "of its session's. An image's offline and online bytes add up to its total; process "
                "start, compilation and TLS count in the total time only.")  # fmt: skip


def _mask_table(masks: dict[str, Any]) -> str:
    """Dice/HD95 per class: secure vs plaintext, and each vs ground truth when available."""
    body = ["<h2>Segmentation masks</h2><table>",
            _head(["class", "comparison", "Dice median", "Dice IQR", "Dice min", "HD95 median (voxels)",
                   "HD95 max", "one mask empty", "voxel agreement"], left=2)]  # fmt: skip
    labels = {"secure_vs_plain": "secure vs plaintext", "secure_vs_truth": "secure vs ground truth",
              "plain_vs_truth": "plaintext vs ground truth"}  # fmt: skip
    for name, m in masks.items():
        for key, label in labels.items():
            c = m.get(key)
            if c is None:
                continue
            d, hd = c["dice"], c["hd95"]
            agree = f"{100 * m['voxel_agreement']:.3f}%" if key == "secure_vs_plain" else ""
            body.append(_row([escape(name), escape(label), _num(d["median"], ".4f"),
                              f"{_num(d['q1'], '.4f')} – {_num(d['q3'], '.4f')}", _num(d["min"], ".4f"),
                              _num(hd["median"], ".2f"), _num(hd["max"], ".2f"), str(c["n_one_empty"]), agree],
                             left=2))  # fmt: skip
    body.append("</table><p class=note>Masks: argmax over output channels (channel 0 = background), "
                "or the single channel thresholded. HD95: 95th percentile of boundary distances in "
                "output voxels, over images where both masks are non-empty.</p>")  # fmt: skip
    return "".join(body)


def render_html(summary: dict[str, Any], figures: dict[str, str]) -> str:
    """The report page from ``summary`` (JSON-ready) and base64 PNG ``figures``."""
    st, costs = summary["study"], summary["costs"]
    title = f"Secure vs plaintext validation of {Path(st.get('model_path') or 'model').name}"
    h: list[str] = [f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title>",
                    f"<style>{_CSS}</style></head><body><h1>{escape(title)}</h1>"]  # fmt: skip
    status = f"<span class=ok>{st['n_ok']} ok</span>, " + (
        f"<span class=bad>{st['n_error']} failed</span>" if st["n_error"] else "0 failed"
    )
    h.append("<table class=meta>" + "".join(_row([escape(k), v]) for k, v in [
        ("images", f"{status} of {st['n_images_study']} in the study"
                   + (f"; {len(summary['data_skipped'])} unreadable file(s) skipped" if summary.get("data_skipped") else "")),
        ("sites", escape(", ".join(f"{s} ({st['n_per_site'].get(s, 0)})" for s in st["sites"]))),
        ("model", f"{escape(str(st['model_path']))}<br><span class=note>SHA-256 {escape(str(st['model_sha256']))}</span>"),
        ("data", escape(str(st["data_dir"]))),
        ("outputs", escape(f"{st['output_kind']}" + (" (sigmoid applied before all statistics)" if st["output_kind"] == "logit" else ""))),
        ("settings", escape(f"equivalence margin ±{st['margin']:g}, label threshold {st['threshold']:g}, alpha {st['alpha']:g}")),
        ("generated", escape(summary.get("generated_at", ""))),
    ]) + "</table>")  # fmt: skip
    if summary["findings"]:
        h.append("<h2>Summary</h2><ul class=sum>")
        h += [f"<li>{escape(f['sentence'])}</li>" for f in summary["findings"]]
        h.append("</ul><h2>All sites pooled</h2><table>" + _head(["finding", *_FINDING_HEAD]))
        h += [
            _row([escape(f["finding"]), *_finding_cells(f["pooled"])]) for f in summary["findings"]
        ]
        h.append("</table><p class=note>Δ = secure − plaintext. DeLong: paired test of equal AUROC "
                 "(DeLong 1988, fast algorithm of Sun &amp; Xu 2014), two-sided. KS: two-sample "
                 "Kolmogorov-Smirnov on the output distributions. TOST: paired two one-sided t-tests, "
                 "equivalence if the 90% CI lies within the margin. Unknown labels are left out of "
                 "AUROCs but not out of the output comparisons.</p>")  # fmt: skip
    if summary.get("masks"):
        h.append(_mask_table(summary["masks"]))
    h.append("<h2>Figures</h2><div class=figs>")
    captions = {"roc": "ROC curves per finding: plaintext (solid) and secure (dashed).",
                "scatter": "Secure against plaintext output; points on the line are identical.",
                "bland_altman": "Bland-Altman: difference against mean, bias and 95% limits of agreement."}  # fmt: skip
    for key, b64 in figures.items():
        h.append(f"<figure><img alt='{escape(key)}' src='data:image/png;base64,{b64}'>"
                 f"<figcaption class=note>{escape(captions.get(key, key))}</figcaption></figure>")  # fmt: skip
    h.append("</div>")
    if summary["findings"]:
        h.append("<h2>Per site</h2><table>" + _head(["site", "finding", *_FINDING_HEAD], left=2))
        for site in st["sites"]:
            h += [_row([escape(site), escape(f["finding"]), *_finding_cells(f["sites"][site])], left=2)
                  for f in summary["findings"] if site in f["sites"]]  # fmt: skip
        h.append("</table>")
    h.append(f"<h2>Cost</h2>{_cost_table(costs)}<p>Projected time for all {costs['n_images_study']} "
             f"images with {costs['workers']} worker(s): <b>{_duration(costs['projected_study_s'])}</b>"
             + (f" (observed throughput: one image every {_duration(costs['observed_s_per_image'])})"
                if costs.get("observed_s_per_image") else "") + ".</p>"
             + ("<p class=note>Images shared secure sessions: each image's time, bytes and rounds are "
                "its own batch plus an even share of its session's one-off part (process start, TLS, "
                "masked weights); CPU time is the session's divided evenly, peak memory the session's.</p>"
                if ((costs.get("session_images") or {}).get("max") or 1) > 1 else "")
             + (f"<p class=note>{_PHASES_NOTE}</p>" if (costs.get("offline_bytes") or {}).get("n") else ""))  # fmt: skip
    if summary["errors"]:
        h.append(
            f"<h2>Failed images ({len(summary['errors'])})</h2><table>"
            + _head(["site", "image", "error"], left=3)
        )
        h += [
            _row([escape(e["site"]), escape(e["image_id"]), escape(e["error"])], left=3)
            for e in summary["errors"][:200]
        ]
        h.append("</table>")  # fmt: skip
    if summary.get("data_skipped"):
        h.append(f"<h2>Files the data loader skipped ({len(summary['data_skipped'])})</h2><ul>")
        h += [f"<li>{escape(line)}</li>" for line in summary["data_skipped"][:200]]
        h.append("</ul>")
    h.append(
        "<p class=note>Generated by privmed. All numbers are also in summary.json.</p></body></html>"
    )
    return "\n".join(h)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_report(results_dir: str | Path, *, margin: float | None = None,
                 threshold: float | None = None) -> tuple[Path, Path, dict[str, Any]]:  # fmt: skip
    """Write ``report.html`` and ``summary.json`` into ``results_dir`` from its database.

    Returns the two paths and the JSON-ready summary.
    """
    results_dir = Path(results_dir)
    with ResultStore.open(results_dir, create=False) as store:
        rows = list(store.rows())
        meta = store.meta()
    summary, arrays = summarize_study(rows, meta, margin=margin, threshold=threshold)
    summary["generated_at"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    summary = json_ready(summary)
    figures: dict[str, str] = {}
    if arrays.plain.shape[0]:
        if not arrays.is_mask:
            figures["roc"] = plots.roc_grid(arrays, summary)
        figures["scatter"] = plots.scatter(arrays)
        figures["bland_altman"] = plots.bland_altman_plot(arrays, summary["all_outputs"])
    html_path, json_path = results_dir / REPORT_NAME, results_dir / SUMMARY_NAME
    _write_atomic(json_path, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    _write_atomic(html_path, render_html(summary, figures))
    return html_path, json_path, summary
