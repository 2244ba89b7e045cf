"""What a segmentation run reports: volumes per class (ml), infected fraction, and costs per slice/patch.

Volumes: a class's volume is its voxel count times the voxel volume |det A| / 1000 ml, with A
the 3x3 part of the input affine. Labels follow the MSD convention of privmed's CT phantoms
(0 background, 1 lung = aerated lung, 2 lesion, a lesion overriding lung), so

- lung volume     = voxels labelled lung or lesion (the lesions lie inside the lungs),
- lesion volume   = voxels labelled lesion,
- infected fraction = lesion volume / lung volume.

Classes are found by name in the model's labels: "lung" (or names starting with "lung"), and
"lesion", "infection", "ggo" or "consolidation" for lesions; models without them get the per
class volumes only.

Costs: the secure session's ``batches`` give time, bytes and rounds of each batch of K
slices/patches. Per item = batch time and bytes / K (rounds are shared by the K items of a
batch: a batch costs the network's rounds once). The masked weights travel once, inside the
first batch; with two or more batches their cost shows as ``first_batch_extra_bytes`` (first
batch minus the median of the others). Bytes outside every batch (plan, seeds, end of session)
are ``outside_batches_bytes``. In the two-party mode the totals also split offline (the
input-independent phase: inline, or the load of sets precomputed into a ``--store``) from
online time and bytes, and count the batches that ran on stored sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from privmed.runtime.stats import BatchCost, SessionStats

LESION_NAMES = ("lesion", "infection", "ggo", "consolidation")


def _find(classes: Sequence[str], match: tuple[str, ...], prefix: bool = False) -> list[int]:
    out = []
    for i, name in enumerate(classes):
        low = name.lower()
        if i > 0 and (low in match or (prefix and any(low.startswith(m) for m in match))):
            out.append(i)
    return out


def volume_summary(labels: np.ndarray, classes: Sequence[str], voxel_ml: float) -> dict[str, Any]:
    """Per-class voxel counts and volumes (ml) and, with lung and lesion classes, the infected fraction."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=len(classes))
    per_class = {
        name: {"voxels": int(counts[i]), "ml": float(counts[i] * voxel_ml)}
        for i, name in enumerate(classes)
        if i > 0
    }
    out: dict[str, Any] = {"voxel_ml": voxel_ml, "classes": per_class}
    lung, lesion = _find(classes, ("lung",), prefix=True), _find(classes, LESION_NAMES)
    if lesion:
        lesion_vox = int(sum(counts[i] for i in lesion))
        out["lesion_ml"] = lesion_vox * voxel_ml
        if lung:
            lung_vox = int(sum(counts[i] for i in lung)) + lesion_vox
            out["lung_ml"] = lung_vox * voxel_ml
            out["infected_fraction"] = lesion_vox / lung_vox if lung_vox else float("nan")
    return out


def _first_batch_extra(batches: list[BatchCost]) -> int | None:
    """Bytes the first batch sent beyond the median later batch of the same size (None: no such batch)."""
    same = [b.bytes for b in batches[1:] if b.n == batches[0].n]
    if not same:
        return None
    return max(0, batches[0].bytes - int(np.median(same)))


def cost_summary(stats: SessionStats, n_items: int, unit: str) -> dict[str, Any]:
    """Per-item and total time/bytes/rounds from an engine's stats (see the module docstring)."""
    batches = stats.batches
    n_in_batches = sum(b.n for b in batches) or n_items
    time_s = sum(b.time_s for b in batches)
    batch_bytes = sum(b.bytes for b in batches)
    total_bytes = stats.bytes_total if stats.bytes_sent else batch_bytes
    out: dict[str, Any] = {
        "unit": unit,
        "items": n_items,
        "batches": len(batches),
        "batch_size": max((b.n for b in batches), default=0),
        "per_item": {
            "time_s": time_s / n_in_batches if n_in_batches else 0.0,
            "bytes": batch_bytes / n_in_batches if n_in_batches else 0.0,
        },
        "rounds_per_batch": int(np.median([b.rounds for b in batches])) if batches else 0,
        "outside_batches_bytes": max(0, total_bytes - batch_bytes),
        "first_batch_extra_bytes": _first_batch_extra(batches),
        "total": {
            "wall_s": stats.wall_s,
            "online_s": stats.online_s,
            "bytes": total_bytes,
            "rounds": stats.rounds,
        },
    }
    if stats.offline_bytes or stats.precomputed_batches:  # two parties: input-independent phase, inline or from a store
        out["total"] |= {"offline_s": stats.offline_s, "offline_bytes": stats.offline_bytes, "online_bytes": stats.online_bytes,
                         "precomputed_batches": stats.precomputed_batches}  # fmt: skip
    if stats.peak_rss_mb:
        out["peak_rss_mb"] = dict(stats.peak_rss_mb)
    if stats.cpu_s:
        out["cpu_s"] = dict(stats.cpu_s)
    return out


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def format_volumes(summary: dict[str, Any]) -> list[str]:
    lines = []
    for name, v in summary["classes"].items():
        lines.append(f"  {name:<14} {v['ml']:>10.2f} ml  ({v['voxels']} voxels)")
    if "infected_fraction" in summary:
        lines.append(
            f"  lesion volume {summary['lesion_ml']:.2f} ml, lung volume {summary['lung_ml']:.2f} ml, "
            f"infected fraction of the lungs {100 * summary['infected_fraction']:.2f} %"
        )
    elif "lesion_ml" in summary:
        lines.append(f"  lesion volume {summary['lesion_ml']:.2f} ml")
    return lines


def format_costs(costs: dict[str, Any], engine: str) -> list[str]:
    unit, per, tot = costs["unit"], costs["per_item"], costs["total"]
    lines = [
        f"  per {unit}: {per['time_s']:.3f} s"
        + (f", {_mb(per['bytes'])} sent" if engine == "secure" else "")
        + (f"; {costs['rounds_per_batch']} rounds per batch of {costs['batch_size']}" if engine == "secure" else ""),
        f"  total: {costs['items']} {unit}{'es' if unit == 'patch' else 's'}",
    ]
    lines[-1] += f" in {costs['batches']} batches, wall {tot['wall_s']:.2f} s (online {tot['online_s']:.2f} s)"
    if engine == "secure":
        lines[-1] += f", {_mb(tot['bytes'])} sent, {tot['rounds']} rounds"
        extra = costs["first_batch_extra_bytes"]
        lines.append(
            f"  once per session: {_mb(costs['outside_batches_bytes'])} outside batches (plan, seeds)"
            + (f", {_mb(extra)} extra in the first batch (masked weights)" if extra is not None else "")
        )
        if "offline_s" in tot:
            stored = tot["precomputed_batches"]
            lines.append(
                f"  offline {tot['offline_s']:.2f} s, {_mb(tot['offline_bytes'])}"
                + (f" (from the store for {stored} of {costs['batches']} batches)" if stored else "")
                + f"; online {tot['online_s']:.2f} s, {_mb(tot['online_bytes'])} (sent by both parties)"
            )
        if "peak_rss_mb" in costs:
            rss = ", ".join(f"{r} {m:.0f} MB" for r, m in costs["peak_rss_mb"].items())
            lines.append(f"  peak memory: {rss}")
    return lines
