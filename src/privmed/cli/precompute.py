"""``--precompute N --store DIR`` and ``--store DIR`` of the two-party mode (``privmed party``,
and the local ``infer``, ``validate`` and ``segment``): the argument checks and the one-line
summaries about a store and the offline / online costs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from privmed.cli.progress import human_bytes
from privmed.errors import InputError

if TYPE_CHECKING:
    from privmed.runtime.stats import SessionStats


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


def check_local_store_args(args: argparse.Namespace, inputs: tuple[str, ...]) -> None:
    """``privmed infer / validate / segment``: --precompute / --store only with --parties 2;
    --precompute N needs --store and runs without any of ``inputs`` (the options that name images)."""
    if args.precompute is None and args.store is None:
        return
    if args.parties != 2:
        raise InputError("--precompute and --store are for the two-party mode (--parties 2)")
    if args.precompute is not None:
        if args.store is None:
            raise InputError("--precompute needs --store DIR")
        if args.precompute < 1:
            raise InputError(f"--precompute: expected at least 1 set, got {args.precompute}")
        if any(getattr(args, option[2:].replace("-", "_"), None) for option in inputs):
            named = f"{', '.join(inputs[:-1])} or {inputs[-1]}" if len(inputs) > 1 else inputs[0]
            raise InputError(f"--precompute runs before any image exists: no {named}")


def check_infer_store_args(args: argparse.Namespace) -> None:
    """``privmed infer``: --precompute / --store only with --parties 2, locally."""
    if args.parties == 2 and args.service is not None:
        raise InputError("--precompute and --store run local two-party sessions, not --service")
    check_local_store_args(args, ("--input", "--output", "--from-pacs"))


def precomputed_line(stats: SessionStats, sets: int, chunk: int, store: Path, unit: str = "image") -> str:
    """What a local precompute run made (``privmed infer / validate / segment --precompute``)."""
    sent = stats.bytes_sent
    return (f"precomputed {sets} sets of {chunk} {unit}(s): {store}/data-owner, {store}/model-owner "
            f"(each party's own part); offline {stats.offline_s:.2f} s, {human_bytes(stats.offline_bytes)} sent in all "
            f"(data owner {human_bytes(sent.get('data-owner', 0))}, model owner {human_bytes(sent.get('model-owner', 0))})")  # fmt: skip


def phases_line(offline_s: float, offline_bytes: int, online_s: float, online_bytes: int) -> str:
    """A two-party run's input-independent and online phases, both parties' bytes sent."""
    return (f"offline {offline_s:.2f} s, {human_bytes(offline_bytes)}; online {online_s:.2f} s, {human_bytes(online_bytes)} "
            "(sent by both parties)")  # fmt: skip


def session_store_lines(stats: SessionStats) -> list[str]:
    """A local run with --store (infer, segment): batches on stored sets and sets left, why a
    batch fell back (one line), and a padded last batch."""
    if not stats.store:
        return []
    lines = store_lines({"store": stats.store, "batches": stats.batches})[:-1]
    if stats.store.get("padded"):
        lines.append(f"last batch padded with {stats.store['padded']} copies of its last input to the sets' batch size "
                     "(their outputs dropped)")  # fmt: skip
    return lines


def precompute_local(args: argparse.Namespace) -> int:
    """``privmed infer --parties 2 --precompute N --store DIR``: both roles on this machine fill
    their stores; prints what was made and its offline cost."""
    from privmed.runtime.twoparty_launch import run_local_session_2p

    result = run_local_session_2p(args.model, None, timeout_s=args.timeout, calibration=args.calibration, frac_bits=args.frac_bits,
                                  chunk=args.chunk, expect_plan=args.expect_plan, store=args.store, precompute=args.precompute,
                                  ot_engine=args.ot_engine)  # fmt: skip
    s = result.stats
    print(f"plan {s.plan.fingerprint if s.plan else '?'} (pin it with --expect-plan)")
    print(precomputed_line(s, args.precompute, args.chunk, args.store))
    if args.stats:
        import json

        args.stats.write_text(json.dumps(s.to_dict(), indent=1))
    return 0
