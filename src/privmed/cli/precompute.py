"""``privmed party --parties 2 --precompute N --store DIR`` and ``--store DIR``: the argument
checks and the one-line summaries a party prints about its store and its costs."""

from __future__ import annotations

import argparse
from typing import Any

from privmed.cli.progress import human_bytes
from privmed.errors import InputError


def check_store_args(args: argparse.Namespace) -> None:
    """One-line errors for --precompute / --store used where they do not apply."""
    if args.precompute is None and args.store is None:
        return
    if args.parties != 2:
        raise InputError("--precompute and --store are for the two-party mode (--parties 2)")
    if args.role not in ("data-owner", "model-owner"):
        raise InputError(f"--precompute and --store: no role {args.role} in the two-party mode")
    if args.precompute is not None:
        if args.store is None:
            raise InputError("--precompute needs --store DIR (where this party keeps its part)")
        if args.precompute < 1:
            raise InputError(f"--precompute: expected at least 1 set, got {args.precompute}")
        if args.role == "data-owner" and (args.input or args.output):
            raise InputError("--precompute runs before any image exists: no --input or --output")


def store_lines(stats: dict[str, Any]) -> list[str]:
    """What this party's session did with its store, and its offline and online costs (both
    directions, this party's own view)."""
    store = stats.get("store")
    off = f"offline {stats.get('offline_s', 0.0):.2f} s, {human_bytes(stats.get('offline_bytes', 0) + stats.get('offline_bytes_recv', 0))}"
    if store and "sets" in store:  # a precompute run
        return [f"precomputed {store['sets']} sets of {store['batch']} image(s) into {store['dir']} (store {store['store']}): {off} "
                f"({human_bytes(stats.get('offline_bytes', 0))} sent, {human_bytes(stats.get('offline_bytes_recv', 0))} received)"]  # fmt: skip
    lines = []
    if store and store["used"]:
        batches = len(stats.get("batches", []))
        lines.append(f"store {store['dir']}: {len(store['used'])} of {batches} batches ran on precomputed sets (online only), "
                     f"{store['left']} sets left")  # fmt: skip
    if store and store["note"]:
        lines.append(store["note"])
    on = f"online {stats.get('online_s', 0.0):.2f} s, {human_bytes(stats.get('online_bytes', 0) + stats.get('online_bytes_recv', 0))}"
    lines.append(f"{off}; {on} (sent and received)")
    return lines
