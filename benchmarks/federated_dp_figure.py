"""Table and figure of the privacy-utility sweep (``federated_dp_sweep.py``), from its points only.

    python benchmarks/federated_dp_figure.py [--points benchmarks/results/federated_dp/points.jsonl]

Writes ``table.md`` next to the points (mean and range of pooled AUROC over the seeds
measured, with the number of seeds, per images-per-site, recipe and epsilon; the loss
against the same recipe without DP at epsilon 8) and ``docs/img/federated_dp.png``. A point
with no measurement is shown as "not measured", never interpolated.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

EPSILONS: list[Any] = [1.0, 2.0, 4.0, 8.0, 16.0, "inf"]
RECIPES = {"end-to-end": "end-to-end small-cnn (first recipe)", "scatter": "scatter + DP head (new default)"}


def _recipes(points: dict[tuple[int, str, Any], list[float]]) -> dict[str, str]:
    """Known recipes first, then variants found in the points (e.g. scatter+ema0.5)."""
    found = sorted({k[1] for k in points} - set(RECIPES))
    return {**RECIPES, **{r: r for r in found}}


def _load(path: Path) -> dict[tuple[int, str, Any], list[float]]:
    by_point: dict[tuple[int, str, Any], list[float]] = defaultdict(list)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        p = json.loads(line)
        if p.get("status") == "complete" and p.get("pooled_auroc") is not None:
            by_point[(int(p["per_site"]), p["recipe"], p["epsilon"])].append(float(p["pooled_auroc"]))
    return by_point


def _cell(values: list[float]) -> str:
    if not values:
        return "not measured"
    mean = sum(values) / len(values)
    return f"{mean:.3f} ({min(values):.3f}-{max(values):.3f}, {len(values)})"


def table(points: dict[tuple[int, str, Any], list[float]]) -> str:
    sizes = sorted({k[0] for k in points})
    head = "| images/site | recipe | " + " | ".join(f"eps {e}" if e != "inf" else "no DP" for e in EPSILONS)
    lines = [head + " | loss at eps 8 |", "|---|---|" + "---|" * (len(EPSILONS) + 1)]
    for n in sizes:
        for recipe in _recipes(points):
            if not any(k[0] == n and k[1] == recipe for k in points):
                continue
            cells = [_cell(points.get((n, recipe, e), [])) for e in EPSILONS]
            dp8, plain = points.get((n, recipe, 8.0), []), points.get((n, recipe, "inf"), [])
            loss = (
                f"{100 * (sum(plain) / len(plain) - sum(dp8) / len(dp8)):.1f} points"
                if dp8 and plain
                else "n/a"
            )
            lines.append(f"| {n} | {recipe} | " + " | ".join(cells) + f" | {loss} |")
    return "\n".join(lines)


def figure(points: dict[tuple[int, str, Any], list[float]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({k[0] for k in points})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4), sharey=True, squeeze=False)
    xs = {e: (math.log2(e) if e != "inf" else 5.3) for e in EPSILONS}
    for ax, n in zip(axes[0], sizes, strict=True):
        for recipe, label in RECIPES.items():  # the figure: the two recipes; variants in the table
            eps = [e for e in EPSILONS if points.get((n, recipe, e))]
            if not eps:
                continue
            vals = [points[(n, recipe, e)] for e in eps]
            means = [sum(v) / len(v) for v in vals]
            low = [m - min(v) for m, v in zip(means, vals, strict=True)]
            high = [max(v) - m for m, v in zip(means, vals, strict=True)]
            finite = [i for i, e in enumerate(eps) if e != "inf"]
            line = ax.errorbar([xs[eps[i]] for i in finite], [means[i] for i in finite],
                               yerr=[[low[i] for i in finite], [high[i] for i in finite]],
                               marker="o", capsize=3, label=label)  # fmt: skip
            if "inf" in eps:
                i = eps.index("inf")
                ax.errorbar([xs["inf"]], [means[i]], yerr=[[low[i]], [high[i]]], marker="s", capsize=3,
                            color=line[0].get_color(), linestyle="none")  # fmt: skip
        ax.set_xticks([xs[e] for e in EPSILONS], [str(e if e == "inf" else int(e)) for e in EPSILONS])
        ax.set_xlabel("epsilon (delta 1e-5, whole run, per site); inf = no DP")
        ax.set_title(f"3 sites x {n} synthetic images, SecAgg+ on")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("pooled AUROC (mean, range over seeds)")
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", default="benchmarks/results/federated_dp/points.jsonl")
    ap.add_argument("--figure", default="docs/img/federated_dp.png")
    args = ap.parse_args()
    points = _load(Path(args.points))
    text = table(points)
    Path(args.points).with_name("table.md").write_text(text + "\n")
    figure(points, Path(args.figure))
    print(text)


if __name__ == "__main__":
    main()
