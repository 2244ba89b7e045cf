"""The session protocol of each role, over channels that are already connected.

Order of a session (every message checked by tag, dtype and shape, every receive with a
deadline):

1. model owner -> data owner, dealer: the public plan (JSON);
2. data owner checks its input against the plan, then -> model owner, dealer: batch size
   (or ``abort`` with the reason, which every other party reports and exits on);
3. dealer -> each party: a fresh 16-byte PRG seed;
4. online pass over the plan (the dealer streams corrections to the model owner meanwhile);
5. the output is revealed to the data owner only; both parties tell the dealer ``done``.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from privmed.compiler.plan import Node, Plan, PrivateWeights
from privmed.compiler.walk import run_plan
from privmed.crypto.prg import SEED_BYTES, PRG
from privmed.errors import InputError, PeerError
from privmed.mpc.correlated import DealerSource, Request, run_dealer
from privmed.mpc.party import Party
from privmed.net.channel import Channel
from privmed.reference.executors import postprocess
from privmed.ring.fixed import decode
from privmed.runtime.backend import SecureBackend

log = logging.getLogger(__name__)
Progress = Callable[[int, int, Node], None]
DONE_TIMEOUT_S = 24 * 3600.0


def peak_rss_mb() -> float:
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


def _stats(role: str, t0: float, channels: list[Channel], rounds: int, layers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "role": role,
        "wall_s": round(time.perf_counter() - t0, 4),
        "cpu_s": round(time.process_time(), 3),
        "bytes_sent": sum(c.counters.bytes_sent for c in channels),
        "bytes_recv": sum(c.counters.bytes_recv for c in channels),
        "messages_sent": sum(c.counters.messages_sent for c in channels),
        "rounds": rounds,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "layers": layers,
    }


def data_owner(to_model: Channel, to_dealer: Channel, x: np.ndarray, progress: Progress | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Run the data owner's side; returns (output after post-processing, stats)."""
    t0 = time.perf_counter()
    plan = Plan.from_json(to_model.recv_text("plan"))
    problem = None
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        problem = f"input must be a float array, got {getattr(x, 'dtype', type(x))}"
    elif list(x.shape[1:]) != list(plan.input_shape):
        problem = f"input shape {tuple(x.shape)} does not match the model input (N, {', '.join(map(str, plan.input_shape))})"
    elif not np.all(np.isfinite(x)):
        problem = "input contains NaN or infinite values"
    if problem:
        for c in (to_model, to_dealer):
            c.abort(f"data owner rejected its input: {problem}")
        raise InputError(problem)
    batch = np.array([x.shape[0]], dtype=np.int64)
    to_model.send("batch", batch)
    to_dealer.send("batch", batch)
    seed = bytes(to_dealer.recv("seed", np.uint8, (SEED_BYTES,)))
    party = Party(0, to_model, DealerSource(0, seed, None))
    tracker = LayerTracker(party, [to_model, to_dealer], plan, progress)
    ring_out, _ = run_plan(plan, SecureBackend(party, plan, int(batch[0]), x=x.astype(np.float64)), int(batch[0]), on_node=tracker)
    out_node = plan.node(plan.output_name)
    logits = decode(ring_out, out_node.scale)
    to_dealer.send("done", np.zeros(1, np.uint8))
    to_model.send("done", np.zeros(1, np.uint8))
    stats = _stats("data-owner", t0, [to_model, to_dealer], party.rounds, tracker.layers)
    stats["plan"] = {"frac_bits": plan.frac_bits, **plan.report}
    return postprocess(logits, out_node.attrs.get("post", {})).astype(np.float32), stats


def model_owner(to_data: Channel, to_dealer: Channel, plan: Plan, weights: PrivateWeights, progress: Progress | None = None) -> dict[str, Any]:
    """Run the model owner's side; the weights never leave this function's process."""
    t0 = time.perf_counter()
    text = plan.to_json()
    to_data.send_text("plan", text)
    to_dealer.send_text("plan", text)
    batch = int(to_data.recv("batch", np.int64, (1,))[0])
    seed = bytes(to_dealer.recv("seed", np.uint8, (SEED_BYTES,)))
    party = Party(1, to_data, DealerSource(1, seed, to_dealer))
    tracker = LayerTracker(party, [to_data, to_dealer], plan, progress)
    run_plan(plan, SecureBackend(party, plan, batch, weights=weights), batch, on_node=tracker)
    to_data.recv("done", np.uint8, (1,))
    to_dealer.send("done", np.zeros(1, np.uint8))
    return _stats("model-owner", t0, [to_data, to_dealer], party.rounds, tracker.layers)


def dealer(to_data: Channel, to_model: Channel, progress: Callable[[Request], None] | None = None) -> dict[str, Any]:
    """Run the dealer: seeds to both parties, then every correction to the model owner."""
    t0 = time.perf_counter()
    plan = Plan.from_json(to_model.recv_text("plan"))
    batch = int(to_data.recv("batch", np.int64, (1,))[0])
    if batch < 1:
        raise PeerError(f"data-owner announced batch size {batch}")
    seed0, seed1 = PRG.fresh().seed, PRG.fresh().seed
    to_data.send("seed", np.frombuffer(seed0, np.uint8))
    to_model.send("seed", np.frombuffer(seed1, np.uint8))
    layers: list[dict[str, Any]] = []
    last = [time.perf_counter(), 0]

    def on_request(req: Request) -> None:
        now, sent = time.perf_counter(), to_model.counters.bytes_sent
        if layers:
            layers[-1]["time_s"] = round(now - last[0], 6)
            layers[-1]["bytes_sent"] = sent - last[1]
        layers.append({"id": req.label, "op": req.node.op})
        last[0], last[1] = now, sent
        if progress:
            progress(req)

    run_dealer(plan, batch, seed0, seed1, to_model, on_request)
    on_request(Request("end", plan.nodes[-1]))
    layers.pop()
    for c in (to_data, to_model):
        c.step = "waiting for the end of the session"
        c.recv("done", np.uint8, (1,), timeout_s=DONE_TIMEOUT_S)
    return _stats("dealer", t0, [to_data, to_model], 0, layers)
