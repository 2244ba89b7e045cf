"""Terminal output shared by the CLI commands: a layer progress line and the cost summary."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from privmed.runtime.stats import SessionStats


def human_bytes(n: float) -> str:
    """Decimal units (1 MB = 10^6 bytes), as the report, the stats files and the docs."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class LayerProgress:
    """One updating line on a terminal; a line every 10% of the layers otherwise."""

    def __init__(self, stream: TextIO | None = None, label: str = "secure inference") -> None:
        self.stream = sys.stderr if stream is None else stream  # the stream of now, not of import time
        self.tty = self.stream.isatty()
        self.label = label
        self._last_decile = -1

    def __call__(self, event: dict[str, Any]) -> None:
        i, total = event.get("done", 0), max(event.get("total", 1), 1)
        batches = event.get("batches") or 1
        where = f"batch {event.get('batch', 0) + 1}/{batches} " if batches > 1 else ""
        text = f"{self.label}: {where}layer {i}/{total} {event.get('op', '')} {event.get('onnx', '')}"[:110]
        if self.tty:
            self.stream.write("\r\033[K" + text)
            if i == total and event.get("batch", 0) + 1 >= batches:
                self.stream.write("\n")
        else:
            b = event.get("batch", 0)
            frac = (b * total + i) / (batches * total)
            decile = int(10 * frac)
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(f"{self.label}: {where}{i}/{total} layers ({100 * frac:.0f}%)\n")
        self.stream.flush()


def summary_table(stats: SessionStats, top: int = 8) -> str:
    """The cost summary printed at the end of a secure run."""
    offline = f"offline {stats.offline_s:.2f} s {human_bytes(stats.offline_bytes)}, " if stats.offline_bytes else ""
    online = f"online {stats.online_s:.2f} s" + (f" {human_bytes(stats.online_bytes)}" if stats.online_bytes else "")
    if stats.precomputed_batches:  # offline material read from a --precompute store: its cost is the load and the agreement
        offline = (f"offline from the store for {stats.precomputed_batches} of {len(stats.batches)} batches, "
                   f"{stats.offline_s:.2f} s {human_bytes(stats.offline_bytes)}; ")  # fmt: skip
    lines = [
        f"wall {stats.wall_s:.2f} s ({offline}{online})   rounds {stats.rounds}   total sent {human_bytes(stats.bytes_total)}",
        f"{'role':<12} {'sent':>10} {'peak RSS':>10}",
    ]
    for r in stats.bytes_sent:
        lines.append(f"{r:<12} {human_bytes(stats.bytes_sent[r]):>10} {stats.peak_rss_mb.get(r, 0.0):>7.0f} MB")
    layers = sorted(stats.layers, key=lambda layer: -layer.time_s)[:top]
    if layers:
        lines.append(f"slowest layers: {'layer':<28} {'op':<10} {'time':>8} {'bytes':>10} {'rounds':>6}")
        for layer in layers:
            name = (layer.onnx or layer.id)[:28]
            op = layer.op + ("/" + layer.kind if layer.kind else "")
            lines.append(f"{'':<16}{name:<28} {op:<10} {layer.time_s:>7.3f}s {human_bytes(layer.bytes):>10} {layer.rounds:>6}")
    return "\n".join(lines)
