"""The session protocol of the two-party mode (no dealer), over one connected channel per role.

Order of a session (every message checked by tag, dtype and shape, every receive with a
deadline; ``privmed.runtime.session`` is the three-role version of the same steps):

1. model owner: checks the plan it compiled fits the two-party mode (``check_two_party``,
   ``check_headroom``), then sends the public plan (canonical JSON);
2. data owner: checks the plan exactly as in the dealer mode (``session.receive_plan``:
   schema, ids, shapes, pinned fingerprint ``expect_plan``), then that the two-party mode can
   run it (``check_two_party``: ring width, no products of two secrets, 2-D linear layers), and
   its input against it; then sends the batch size (or ``abort`` with the reason). Nothing
   derived from the input, and no key, is sent before the plan passed;
3. per batch, with the batch size: the data owner's offer of a precomputed set (store id and
   index, or none; ``twoparty_store.offer_set`` / ``answer_offer``); if the model owner
   accepts, both delete the set and step 5 uses it (no step 4);
4. otherwise, on first need, the set-up (``open_session``): the data owner's BFV public key,
   base OTs both ways; then the batch's offline phase (``prepare_offline``: HE products on
   random masks, ReLU OT material; input-independent);
5. the online walk over the plan; the output is revealed to the data owner only;
6. steps 2 (batch size) to 5 repeat per batch; batch size 0 ends the session.

Stats: the roles' dicts have the dealer mode's fields (``merge_two`` builds the same
``SessionStats``), with ``offline_s`` / ``offline_bytes`` (a stored batch's: its load and the
offer) and ``online_s`` / ``online_bytes`` per batch and in total, bytes received alike
(``_recv``), ``precomputed_batches`` and the ``store`` summary.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np

from privmed.crypto.prg import PRG
from privmed.errors import InputError, PrivmedError, ProtocolError
from privmed.ir.ops import postprocess
from privmed.ir.plan import Plan, PrivateWeights
from privmed.ir.walk import run_plan
from privmed.mpc.correlation.requests import Request
from privmed.mpc.twoparty.he_layers import lower
from privmed.mpc.twoparty.protocols import (
    MAX_EINSUM_EXPANSION,
    MAX_RING_BITS,
    Offline,
    ProductsNotSupported,
    Recorder,
    TwoPartyOnline,
    TwoPartySession,
    check_headroom,
    open_session,
    prepare_offline,
    ring_bits,
)
from privmed.mpc.twoparty.stored import Rings, offline_from_arrays, ot_from_arrays, ot_label
from privmed.net.channel import Channel
from privmed.ring.fixed import decode
from privmed.runtime.backend import SecureBackend
from privmed.runtime.session import (
    LayerTracker,
    Progress,
    _batch_progress,
    _check_batch,
    _stats,
    _sum_layers,
    next_batch,
    plan_info,
    receive_plan,
)
from privmed.runtime.stats import SessionStats, merge_roles
from privmed.runtime.twoparty_store import StoreUse, answer_offer, offer_set


def schedule(plan: Plan, batch: int, batch_index: int) -> list[tuple[str, Request]]:
    """Every secret op of one batch, in the order the parties run them (a recording walk)."""
    rec = Recorder(batch_index)
    run_plan(plan, SecureBackend(plan, rec), batch)
    return rec.log


def _expansion(equation: str, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> int:
    """Elements of an einsum's full expansion (every axis of the equation once)."""
    xl, yl = equation.split("->")[0].split(",")
    sizes = dict(zip(xl, x_shape, strict=True)) | dict(zip(yl, y_shape, strict=True))
    return int(np.prod(list(sizes.values())))


def check_two_party(plan: Plan) -> tuple[int, int]:
    """Refuse, in one line, a plan the two-party mode cannot run; else the rings
    (shares' ring bits, HE ring bits), from the public plan alone (both parties run it before
    anything else is sent).

    Narrow mode (l, l), l = ``ring_bits``: plans without products of two secrets whose
    comparisons fit l <= ``MAX_RING_BITS``. Wide mode (64, ``MAX_RING_BITS``) otherwise:
    shares over Z_2^64 as in the dealer mode, each HE layer's result extended back to 64 bits
    and comparisons run on their own width. Refused: einsums of two secrets (attention) whose
    expansion exceeds ``MAX_EINSUM_EXPANSION`` and linear layers Cheetah's encodings do not
    cover (kernels of 4 or more spatial dimensions).
    """
    steps = schedule(plan, 1, 0)
    too_big = sorted({plan.nodes[r.node_index].id for what, r in steps if what == "product" and r.product and r.product.equation
                      and _expansion(r.product.equation, r.product.x_shape, r.product.y_shape) > MAX_EINSUM_EXPANSION})  # fmt: skip
    if too_big:
        raise ProductsNotSupported(
            f"two-party mode: matrix products of two secret tensors larger than {MAX_EINSUM_EXPANSION} expanded elements "
            f"(attention over many tokens) are not supported yet: {', '.join(too_big[:6])}"
            + (f" and {len(too_big) - 6} more" if len(too_big) > 6 else "")
        )
    for what, r in steps:
        if what == "linear" and r.linear is not None and r.linear.kind != "channel_scale":  # scales: by OT, any shape
            try:
                lower(r.linear.kind, r.linear.conv, r.linear.x_shape, r.linear.w_shape)
            except (ValueError, NotImplementedError, ProtocolError) as exc:
                raise ProtocolError(f"two-party mode: node {plan.nodes[r.node_index].id}: {exc}") from None
    narrow = ring_bits(plan)
    if any(what == "product" for what, _ in steps) or narrow > MAX_RING_BITS:
        return 64, MAX_RING_BITS
    return narrow, narrow


def _sent(ch: Channel) -> int:
    return ch.counters.bytes_sent


def _recv(ch: Channel) -> int:
    return ch.counters.bytes_recv


def _batch(s: TwoPartySession, plan: Plan, index: int, n: int, tracker: LayerTracker, offline: Offline, start: tuple[float, int, int, int],
           weights: PrivateWeights | None = None, x: np.ndarray | None = None) -> tuple[np.ndarray | None, dict[str, Any]]:  # fmt: skip
    """The online phase of one batch after its offline phase (inline or from a store) that
    began at ``start`` = (time, bytes sent, bytes received, offline rounds before it); returns
    (output ring values or None, costs)."""
    t0, b0, r0, o0 = start
    t1, b1, r1 = time.perf_counter(), _sent(s.ch), _recv(s.ch)
    rounds0 = s.rounds
    backend = SecureBackend(plan, TwoPartyOnline(s, index, offline), weights=weights, x=x)
    out, _ = run_plan(plan, backend, n, on_node=tracker)
    t2 = time.perf_counter()
    return out, {"index": index, "n": n, "time_s": round(t2 - t0, 4), "bytes_sent": _sent(s.ch) - b0,
                 "rounds": s.rounds - rounds0, "offline_s": round(t1 - t0, 4), "offline_bytes": b1 - b0, "offline_rounds": o0,
                 "offline_bytes_recv": r1 - r0, "online_s": round(t2 - t1, 4), "online_bytes": _sent(s.ch) - b1,
                 "online_bytes_recv": _recv(s.ch) - r1}  # fmt: skip


class _Offline:
    """Where a party's batches get their offline material: a stored set when both parties hold
    one that matches (``twoparty_store``), else ``prepare_offline`` on a session opened on
    first need (HE key and base OTs)."""

    def __init__(self, ch: Channel, is_data_owner: bool, plan: Plan, bits: int, he_bits: int, store: StoreUse | None,
                 peer: str, weights: PrivateWeights | None = None, ot_engine: str | None = None) -> None:  # fmt: skip
        self.ch, self.is_data_owner, self.plan, self.weights, self.store = ch, is_data_owner, plan, weights, store
        self.ot_engine = ot_engine
        self.bits, self.he_bits, self.peer = bits, he_bits, peer
        self.inline: TwoPartySession | None = None
        self.setup: dict[str, float] = {}
        self.prg = PRG.fresh()

    def binding(self, n: int) -> dict[str, Any]:
        return {"plan": self.plan.fingerprint(), "peer": self.peer, "batch": n, "bits": self.bits, "he_bits": self.he_bits}

    def _build(self, steps: list[tuple[str, Request]]) -> Any:
        def build(path: Any, arrays: dict[str, np.ndarray], sid: str, index: int) -> tuple[TwoPartySession, Offline]:
            offline = offline_from_arrays(str(path), Rings(self.is_data_owner, self.bits, self.he_bits), steps, arrays)
            ot = ot_from_arrays(self.ch, ot_label(sid, index), self.is_data_owner, arrays)
            return TwoPartySession(self.ch, self.is_data_owner, self.bits, self.he_bits, ot, None, self.prg), offline

        return build

    def get(self, index: int, n: int) -> tuple[TwoPartySession, Offline, tuple[float, int, int, int]]:
        """(session, checked offline material, start of the offline phase) for batch ``index``."""
        start = (time.perf_counter(), _sent(self.ch), _recv(self.ch))
        steps = schedule(self.plan, n, index)
        negotiate = offer_set if self.is_data_owner else answer_offer
        stored = negotiate(self.ch, self.store, self.binding(n), self._build(steps))
        if stored is not None:
            return *stored, (*start, 0)
        if self.inline is None:
            self.inline = _open(self.ch, self.is_data_owner, self.bits, self.he_bits, self.setup, self.ot_engine)
        o0 = self.inline.offline_rounds
        offline = prepare_offline(self.inline, self.plan, steps, self.weights)
        return self.inline, offline, (*start, self.inline.offline_rounds - o0)


def _open(ch: Channel, is_data_owner: bool, bits: int, he_bits: int, setup: dict[str, float], ot_engine: str | None = None) -> TwoPartySession:
    """``open_session`` (``ot_engine`` None: the environment's, else the default), its time and
    bytes recorded as offline cost."""
    t0, b0, r0 = time.perf_counter(), _sent(ch), _recv(ch)
    s = open_session(ch, is_data_owner, bits, he_bits, ot_engine=ot_engine)
    setup.update(offline_s=time.perf_counter() - t0, offline_bytes=_sent(ch) - b0, offline_bytes_recv=_recv(ch) - r0,
                 offline_rounds=s.offline_rounds)  # fmt: skip
    return s


def _totals(stats: dict[str, Any], per_batch: list[dict[str, Any]], setup: dict[str, float], store: StoreUse | None) -> None:
    """Per-batch costs and totals; the session set-up (key, base OTs) counts as offline.

    The set-up's time and bytes are already inside the offline cost of the first batch that
    computed its material inline (``_Offline.get`` starts that batch's clock and byte counts
    before opening the session); only its rounds, counted apart, are added here."""
    stats["batches"] = per_batch
    stats["rounds"] = sum(b["rounds"] for b in per_batch)
    for key in ("offline_s", "online_s", "offline_bytes", "online_bytes", "offline_rounds", "offline_bytes_recv", "online_bytes_recv"):
        total = sum(b[key] for b in per_batch) + (setup.get(key, 0) if key == "offline_rounds" else 0)
        stats[key] = round(total, 4) if key.endswith("_s") else int(total)
    stats["precomputed_batches"] = len(store.used) if store else 0
    if store is not None:
        stats["store"] = store.summary()


def data_owner_2p(
    to_model: Channel,
    batches: np.ndarray | Iterable[np.ndarray],
    progress: Progress | None = None,
    total_batches: int | None = None,
    expect_plan: str | None = None,
    on_plan: Callable[[Plan], None] | None = None,
    store: StoreUse | None = None,
    ot_engine: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """The data owner's side (see the module docstring). Returns (outputs, stats). With
    ``store``, each batch runs on a precomputed set when both parties hold a matching one;
    ``ot_engine`` for an inline offline phase (``protocols.open_session``)."""
    t0 = time.perf_counter()
    if isinstance(batches, np.ndarray):
        batches, total_batches = [batches], 1
    plan, bits, he_bits = accept_plan(to_model, expect_plan, on_plan)
    source = _Offline(to_model, True, plan, bits, he_bits, store, store.peer if store else "", ot_engine=ot_engine)
    outputs: list[np.ndarray] = []
    per_batch: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    out_node = plan.node(plan.output_name)
    for index, x in enumerate(batches):
        problem = _check_batch(x, plan)
        if problem:
            to_model.abort(f"data owner rejected its input: {problem}")
            raise InputError(problem)
        to_model.send("batch", np.array([x.shape[0]], dtype=np.int64))
        s, offline, start = source.get(index, int(x.shape[0]))
        tracker = LayerTracker(cast(Any, s), [to_model], plan, _batch_progress(progress, index, total_batches))
        ring_out, cost = _batch(s, plan, index, int(x.shape[0]), tracker, offline, start, x=x.astype(np.float64))
        assert ring_out is not None  # the data owner's reveal returns the value
        outputs.append(postprocess(decode(ring_out, out_node.scale), out_node.attrs.get("post", {})).astype(np.float32))
        layers = _sum_layers(layers, tracker.layers)
        per_batch.append(cost)
    if not per_batch:
        raise InputError("no input batches")
    to_model.send("batch", np.zeros(1, np.int64))
    to_model.finish()
    stats = _stats("data-owner", t0, [to_model], 0, layers)
    _totals(stats, per_batch, source.setup, store)
    stats["plan"] = plan_info(plan)
    stats["ring_bits"], stats["he_ring_bits"] = bits, he_bits
    return np.concatenate(outputs), stats


def accept_plan(to_model: Channel, expect_plan: str | None, on_plan: Callable[[Plan], None] | None) -> tuple[Plan, int, int]:
    """Data owner: the model owner's plan, checked as in the dealer mode and for this mode
    (refused with an abort naming the reason); returns (plan, ring bits, HE ring bits)."""
    plan = receive_plan(to_model, [], None, expect_plan)
    try:
        bits, he_bits = check_two_party(plan)
    except PrivmedError as exc:
        to_model.abort(f"data owner refused the plan: {exc}")
        raise
    if on_plan:
        on_plan(plan)
    return plan, bits, he_bits


def send_plan(to_data: Channel, plan: Plan) -> tuple[int, int]:
    """Model owner: check the plan fits this mode, send it; returns the rings."""
    try:
        bits, he_bits = check_two_party(plan)
        check_headroom(plan, he_bits)
    except PrivmedError as exc:
        to_data.abort(f"model owner cannot run this model in two-party mode: {exc}")
        raise
    to_data.send_text("plan", plan.to_json())
    return bits, he_bits


def model_owner_2p(to_data: Channel, plan: Plan, weights: PrivateWeights, progress: Progress | None = None,
                   store: StoreUse | None = None, ot_engine: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The model owner's side; the weights never leave this function's process. With
    ``store``, a batch the data owner offers a matching precomputed set for runs online only."""
    t0, helpers0 = time.perf_counter(), helper_usage()
    bits, he_bits = send_plan(to_data, plan)
    source = _Offline(to_data, False, plan, bits, he_bits, store, store.peer if store else "", weights, ot_engine)
    layers: list[dict[str, Any]] = []
    per_batch: list[dict[str, Any]] = []
    index = 0
    while batch := next_batch(to_data, plan, first=index == 0):
        s, offline, start = source.get(index, batch)
        tracker = LayerTracker(cast(Any, s), [to_data], plan, None)
        _, cost = _batch(s, plan, index, batch, tracker, offline, start, weights=weights)
        layers = _sum_layers(layers, tracker.layers)
        per_batch.append(cost)
        index += 1
    stats = _stats("model-owner", t0, [to_data], 0, layers)
    _totals(stats, per_batch, source.setup, store)
    add_helpers(stats, helpers0)
    return stats


def helper_usage() -> tuple[float, float]:
    """(CPU seconds, peak RSS in MB) of this process's finished child processes so far: the
    model owner's HE helpers (``he_offline.HEHelper``, each joined when its offline phase ends)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0


def add_helpers(stats: dict[str, Any], before: tuple[float, float]) -> None:
    """Count the HE helpers that ran since ``before`` in the role's costs: their CPU in
    ``cpu_s`` (and ``helper_cpu_s``), the largest one's peak RSS added to ``peak_rss_mb`` (they
    run beside the role's process; ``helper_peak_rss_mb``)."""
    cpu, rss = helper_usage()
    if cpu - before[0] > 0:
        stats["helper_cpu_s"] = round(cpu - before[0], 3)
        stats["cpu_s"] = round(stats["cpu_s"] + cpu - before[0], 3)
        stats["helper_peak_rss_mb"] = round(rss, 1)
        stats["peak_rss_mb"] = round(stats["peak_rss_mb"] + rss, 1)


def merge_two(per_role: dict[str, dict[str, Any]], wall_s: float) -> SessionStats:
    """``merge_roles`` for the two roles (no dealer entry in any total); ``online_s`` is the
    data owner's online phases, ``offline_s`` / ``offline_bytes`` the input-independent ones
    (both inside ``wall_s`` and ``bytes_sent``); ``rounds`` are online rounds."""
    empty = {"layers": [], "batches": [], "bytes_sent": 0, "peak_rss_mb": 0.0}
    merged = merge_roles({**per_role, "dealer": empty}, wall_s)
    for table in (merged.bytes_sent, merged.peak_rss_mb, merged.cpu_s):
        table.pop("dealer", None)
    for layer in merged.layers:
        layer.bytes_by_role.pop("dealer", None)
    do = per_role["data-owner"]
    merged.online_s = float(do.get("online_s", merged.online_s))
    merged.offline_s = float(do.get("offline_s", 0.0))
    merged.offline_bytes = sum(int(s.get("offline_bytes", 0)) for s in per_role.values())
    merged.online_bytes = sum(int(s.get("online_bytes", 0)) for s in per_role.values())
    merged.precomputed_batches = int(do.get("precomputed_batches", 0))
    merged.store = dict(do.get("store", {}))
    return merged
