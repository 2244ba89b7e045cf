"""The session protocol of each role, over channels that are already connected.

Order of a session (every message checked by tag, dtype and shape, every receive with a
deadline):

1. model owner -> data owner, dealer: the public plan (canonical JSON, at most
   ``privmed.ir.check.MAX_PLAN_BYTES``);
2. data owner and dealer check the plan (``privmed.ir.check.parse_plan``: schema, ids,
   topological order, every shape recomputed) and the data owner its pinned fingerprint
   (``expect_plan``) and its input against the plan; then data owner -> model owner, dealer:
   batch size (or ``abort`` with the reason, which every other party reports and exits on).
   Nothing derived from the input is sent before the plan passed;
3. dealer -> each party: a fresh 16-byte PRG seed;
4. online pass over the plan (the dealer streams corrections to the model owner meanwhile);
5. the output is revealed to the data owner only;
6. steps 2 (batch size) and 4-5 repeat for every further batch of the session (a stream of
   slices or patches): the dealer's seeds and the masked weights are reused, every mask and
   correlation is fresh per batch; batch size 0 ends the session and the model owner tells the
   dealer ``done``.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from privmed.crypto.prg import PRG, SEED_BYTES
from privmed.errors import InputError, ProtocolError
from privmed.ir.check import MAX_PLAN_BYTES, PlanError, parse_plan
from privmed.ir.ops import postprocess
from privmed.ir.plan import Node, Plan, PrivateWeights
from privmed.ir.walk import run_plan
from privmed.mpc.correlation.dealer import serve
from privmed.mpc.correlation.requests import Request
from privmed.mpc.correlation.source import DealerSource
from privmed.mpc.party import Party
from privmed.mpc.protocols import Online, Schedule
from privmed.net.channel import Channel
from privmed.ring.fixed import decode
from privmed.runtime.backend import SecureBackend

log = logging.getLogger(__name__)
Progress = Callable[[int, int, Node], None]
# Waits for the next batch can legitimately last a whole batch's computation; they still end at
# once when any peer aborts or disconnects (``FailureGroup``), and the computing parties watch
# each other with the normal per-receive deadline.
DONE_TIMEOUT_S = 24 * 3600.0
MAX_BATCH_ELEMENTS = 1 << 32  # batch size x the plan's largest tensor: caps what a batch may allocate


def plan_info(plan: Plan) -> dict[str, Any]:
    """What the data owner's stats record of the plan it accepted (``runtime.stats.PlanInfo``)."""
    return {"frac_bits": plan.frac_bits, "fingerprint": plan.fingerprint(), "nodes": len(plan.nodes),
            "comparisons": _comparisons(plan)}  # fmt: skip


def next_batch(to_data: Channel, plan: Plan, *, first: bool, others: list[Channel] | None = None) -> int:
    """The data owner's next batch size, checked against the plan before anything is allocated
    for it; 0 ends the session (the channel is then finished). Waits after the first batch may
    last a whole batch's computation (``DONE_TIMEOUT_S``)."""
    for c in [to_data, *(others or [])]:
        c.step = "waiting for the next batch"
    batch = int(to_data.recv("batch", np.int64, (1,), timeout_s=None if first else DONE_TIMEOUT_S)[0])
    _check_batch_size(batch, plan, "data-owner")
    if batch == 0:
        to_data.finish()
    return batch


def _check_batch_size(batch: int, plan: Plan, peer: str) -> None:
    largest = max(int(np.prod(n.shape)) for n in plan.nodes)
    if batch < 0 or batch * largest > MAX_BATCH_ELEMENTS:
        raise ProtocolError(f"{peer} announced batch size {batch}: expected 0..{MAX_BATCH_ELEMENTS // largest} for this plan")


def peak_rss_mb() -> float:
    """This process's own peak resident set (VmHWM). ``ru_maxrss`` is not used: Linux carries
    the parent's peak over into a forked child, so every role would report the launcher's."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class LayerTracker:
    """Per-node wall time, bytes sent and rounds; names the current step on every channel."""

    def __init__(self, party: Party | None, channels: list[Channel], plan: Plan, progress: Progress | None) -> None:
        self.party = party
        self.channels = channels
        self.total = len(plan.nodes)
        self.index = {n.id: i for i, n in enumerate(plan.nodes)}
        self.progress = progress
        self.layers: list[dict[str, Any]] = []
        self._start: tuple[float, int, int] = (0.0, 0, 0)

    def _bytes(self) -> int:
        return sum(c.counters.bytes_sent for c in self.channels)

    def __call__(self, node: Node, phase: str) -> None:
        rounds = self.party.rounds if self.party else 0
        if phase == "start":
            for c in self.channels:
                c.step = f"layer {node.id} ({node.attrs.get('onnx', node.op)})"
            self._start = (time.perf_counter(), self._bytes(), rounds)
            return
        t0, b0, r0 = self._start
        self.layers.append({
            "id": node.id, "op": node.op, "onnx": node.attrs.get("onnx", ""), "kind": node.attrs.get("kind", ""),
            "elements": int(np.prod(node.shape)), "time_s": round(time.perf_counter() - t0, 6),
            "bytes_sent": self._bytes() - b0, "rounds": rounds - r0,
        })
        if self.progress:
            self.progress(self.index[node.id] + 1, self.total, node)


def _stats(role: str, t0: float | tuple[float, float], channels: list[Channel], rounds: int, layers: list[dict[str, Any]]) -> dict[str, Any]:
    """``t0`` = (perf_counter, process_time) at the start of the role's session: wall and CPU
    seconds are the session's own (not the process's imports, compilation or other work); a
    bare perf_counter counts the CPU of the whole process."""
    if not isinstance(t0, tuple):
        t0 = (t0, 0.0)
    return {
        "role": role,
        "wall_s": round(time.perf_counter() - t0[0], 4),
        "cpu_s": round(time.process_time() - t0[1], 3),
        "bytes_sent": sum(c.counters.bytes_sent for c in channels),
        "bytes_recv": sum(c.counters.bytes_recv for c in channels),
        "messages_sent": sum(c.counters.messages_sent for c in channels),
        "rounds": rounds,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "layers": layers,
    }


def _check_batch(x: np.ndarray, plan: Plan) -> str | None:
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        return f"input must be a float array, got {getattr(x, 'dtype', type(x))}"
    if list(x.shape[1:]) != list(plan.input_shape) or x.shape[0] < 1:
        return f"input shape {tuple(x.shape)} does not match the model input (N, {', '.join(map(str, plan.input_shape))})"
    if not np.all(np.isfinite(x)):
        return "input contains NaN or infinite values"
    return None


def receive_plan(to_model: Channel, others: list[Channel], input_shape: list[int] | None = None,
                 expect_plan: str | None = None) -> Plan:
    """Receive and check the model owner's plan (step 2); on refusal abort every channel.

    ``input_shape`` is the shape the receiver's own data has (None for the dealer);
    ``expect_plan`` the SHA-256 fingerprint the receiver approved, if any.
    """
    text = bytes(to_model.recv("plan", np.uint8, None, max_bytes=MAX_PLAN_BYTES)).decode("utf-8", "replace")
    try:
        plan = parse_plan(text, input_shape)
        if expect_plan and plan.fingerprint() != expect_plan.strip().lower():
            raise PlanError(f"refused the model owner's plan: fingerprint {plan.fingerprint()} is not the approved {expect_plan.strip().lower()}")
    except PlanError as exc:
        for c in [to_model, *others]:
            c.abort(str(exc))
        raise
    return plan


def data_owner(
    to_model: Channel,
    to_dealer: Channel,
    batches: np.ndarray | Iterable[np.ndarray],
    progress: Progress | None = None,
    total_batches: int | None = None,
    expect_plan: str | None = None,
    on_plan: Callable[[Plan], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the data owner's side over one batch or a stream of batches (one session: the
    masked weights travel once). Returns (outputs of all batches concatenated, stats).

    The plan, and then each batch against it, is checked before anything is sent;
    ``on_plan`` sees the accepted plan (the CLI prints its fingerprint)."""
    t0 = (time.perf_counter(), time.process_time())
    if isinstance(batches, np.ndarray):
        batches, total_batches = [batches], 1
    # the plan is checked on its own here; the input against it just below (_check_batch), so
    # that a wrong input is reported as such: both before anything is sent
    plan = receive_plan(to_model, [to_dealer], None, expect_plan)
    if on_plan:
        on_plan(plan)
    party: Party | None = None
    cache: dict[str, np.ndarray] = {}
    outputs: list[np.ndarray] = []
    per_batch: list[dict[str, Any]] = []
    layers: list[dict[str, Any]] = []
    out_node = plan.node(plan.output_name)
    chans = [to_model, to_dealer]
    for index, x in enumerate(batches):
        problem = _check_batch(x, plan)
        if problem:
            for c in chans:
                c.abort(f"data owner rejected its input: {problem}")
            raise InputError(problem)
        n = np.array([x.shape[0]], dtype=np.int64)
        b0 = sum(c.counters.bytes_sent for c in chans)
        tb = time.perf_counter()
        for c in chans:
            c.send("batch", n)
        if party is None:
            seed = bytes(to_dealer.recv("seed", np.uint8, (SEED_BYTES,)))
            party = Party(0, to_model, DealerSource(0, seed, None), ring_bits=plan.ring_bits)
        r0 = party.rounds
        tracker = LayerTracker(party, chans, plan, _batch_progress(progress, index, total_batches))
        backend = SecureBackend(plan, Online(party, index, cache), x=x.astype(np.float64))
        ring_out, _ = run_plan(plan, backend, int(n[0]), on_node=tracker)
        outputs.append(postprocess(decode(ring_out, out_node.scale), out_node.attrs.get("post", {})).astype(np.float32))
        layers = _sum_layers(layers, tracker.layers)
        per_batch.append({"index": index, "n": int(n[0]), "time_s": round(time.perf_counter() - tb, 4),
                          "bytes_sent": sum(c.counters.bytes_sent for c in chans) - b0, "rounds": party.rounds - r0})
    if party is None:
        raise InputError("no input batches")
    for c in chans:
        c.send("batch", np.zeros(1, np.int64))  # end of the session
        c.finish()
    stats = _stats("data-owner", t0, chans, party.rounds, layers)
    stats["batches"] = per_batch
    stats["plan"] = plan_info(plan)
    return np.concatenate(outputs), stats


def _comparisons(plan: Plan) -> int:
    """Elements compared per sample (ReLUs and max-pool pairs), from the public plan."""
    total = 0
    for n in plan.nodes:
        if n.op in ("relu", "leaky_relu"):
            total += int(np.prod(n.shape))
        elif n.op == "maxpool":
            total += int(np.prod(n.shape)) * (int(np.prod(n.attrs["kernel"])) - 1)
    return total


def _batch_progress(progress: Progress | None, index: int, total: int | None) -> Progress | None:
    if progress is None:
        return None

    def emit(done: int, total_layers: int, node: Node) -> None:
        progress(done, total_layers, node, index, total)  # type: ignore[call-arg]

    return emit


def _sum_layers(acc: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-layer costs summed over batches."""
    if not acc:
        return [dict(layer) for layer in new]
    for a, b in zip(acc, new, strict=True):
        for key in ("time_s", "bytes_sent", "rounds"):
            a[key] = round(a[key] + b[key], 6) if key == "time_s" else a[key] + b[key]
    return acc


def model_owner(to_data: Channel, to_dealer: Channel, plan: Plan, weights: PrivateWeights, progress: Progress | None = None) -> dict[str, Any]:
    """Run the model owner's side; the weights never leave this function's process."""
    t0 = (time.perf_counter(), time.process_time())
    text = plan.to_json()
    to_data.send_text("plan", text)
    to_dealer.send_text("plan", text)
    party: Party | None = None
    cache: dict[str, np.ndarray] = {}
    layers: list[dict[str, Any]] = []
    per_batch: list[dict[str, Any]] = []
    chans = [to_data, to_dealer]
    while batch := next_batch(to_data, plan, first=not per_batch, others=[to_dealer]):
        index = len(per_batch)
        b0 = sum(c.counters.bytes_sent for c in chans)
        if party is None:
            seed = bytes(to_dealer.recv("seed", np.uint8, (SEED_BYTES,)))
            party = Party(1, to_data, DealerSource(1, seed, to_dealer), ring_bits=plan.ring_bits)
        tracker = LayerTracker(party, chans, plan, None)
        run_plan(plan, SecureBackend(plan, Online(party, index, cache), weights=weights), batch, on_node=tracker)
        layers = _sum_layers(layers, tracker.layers)
        per_batch.append({"index": index, "n": batch, "bytes_sent": sum(c.counters.bytes_sent for c in chans) - b0})
    to_dealer.send("done", np.zeros(1, np.uint8))
    to_dealer.finish()
    stats = _stats("model-owner", t0, chans, party.rounds if party else 0, layers)
    stats["batches"] = per_batch
    return stats


def dealer(to_data: Channel, to_model: Channel) -> dict[str, Any]:
    """Run the dealer: seeds to both parties, then every correction to the model owner.

    The dealer walks the plan with the parties' own executor and a recording protocol set
    (``privmed.mpc.protocols.Schedule``): each correlation is served in the order the parties
    consume it, by construction."""
    t0 = (time.perf_counter(), time.process_time())
    plan = receive_plan(to_model, [to_data])
    prgs: tuple[PRG, PRG, PRG] | None = None
    layers: list[dict[str, Any]] = []
    per_batch: list[dict[str, Any]] = []
    while batch := next_batch(to_data, plan, first=not per_batch):
        if prgs is None:
            prgs = (PRG.fresh(), PRG.fresh(), PRG.fresh())
            to_data.send("seed", np.frombuffer(prgs[0].seed, np.uint8))
            to_model.send("seed", np.frombuffer(prgs[1].seed, np.uint8))
        b0 = to_model.counters.bytes_sent
        tracker = LayerTracker(None, [to_model], plan, None)
        keys = prgs

        def serve_request(req: Request, keys: tuple[PRG, PRG, PRG] = keys) -> None:
            serve(req, keys, to_model)

        run_plan(plan, SecureBackend(plan, Schedule(len(per_batch), serve_request, plan.ring_bits)), batch, on_node=tracker)
        layers = _sum_layers(layers, tracker.layers)
        per_batch.append({"index": len(per_batch), "n": batch, "bytes_sent": to_model.counters.bytes_sent - b0})
    to_model.step = "waiting for the end of the session"
    to_model.recv("done", np.uint8, (1,))
    to_model.finish()
    stats = _stats("dealer", t0, [to_data, to_model], 0, layers)
    stats["batches"] = per_batch
    return stats
