"""The precompute session of the two-party mode (``privmed party --parties 2 --precompute N
--store DIR``): the offline phase of N batches made before any image exists, each party
writing only its own part to its own store (``privmed.runtime.twoparty_store``).

Order (every message checked by tag, dtype and shape, every receive with a deadline):

1. model owner: checks and sends the plan (as ``model_owner_2p``); data owner: checks it
   (``accept_plan``: schema, pinned fingerprint, two-party fit);
2. data owner: sends (N, batch size); the model owner refuses more sets than it was started
   for, or a batch size the plan does not allow (abort with the reason);
3. both: 16 random bytes each, the store id is their hash (``twoparty_store.store_id``); each
   creates its store bound to (store id, plan fingerprint, peer certificate fingerprint, batch
   size, rings);
4. set-up (``open_session``: BFV public key, base OTs), then for k < N: ``prepare_offline``
   for the plan's schedule as batch k (stream keys and labels unique per set), written as
   ``set-k.npz`` with the IKNP state (seeds derived per set, continued later under a
   per-set label);
5. data owner: sends N (done); both record the costs in their manifests.

Nothing depends on an input. Stats: ``offline_s`` / ``offline_bytes`` (/ ``_recv``) are steps
3-5; ``online_s`` is 0.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import InputError, ProtocolError
from privmed.ir.plan import Plan, PrivateWeights
from privmed.mpc.twoparty.protocols import prepare_offline
from privmed.mpc.twoparty.stored import offline_arrays, ot_label
from privmed.net.channel import Channel
from privmed.runtime.session import _check_batch_size, _stats, plan_info
from privmed.runtime.twoparty import (
    _open,
    accept_plan,
    add_helpers,
    helper_usage,
    schedule,
    send_plan,
)
from privmed.runtime.twoparty_store import Store, store_id

MAX_SETS = 10000


def data_owner_precompute(to_model: Channel, root: Path, sets: int, batch: int, peer: str, expect_plan: str | None = None,
                          on_plan: Callable[[Plan], None] | None = None, ot_engine: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The data owner's side: ``sets`` batches of ``batch`` images into ``root``. Returns stats."""
    if not 1 <= sets <= MAX_SETS or batch < 1:
        raise InputError(f"--precompute: expected 1..{MAX_SETS} sets of at least 1 image, got {sets} of {batch}")
    t0 = time.perf_counter()
    plan, bits, he_bits = accept_plan(to_model, expect_plan, on_plan)
    try:
        _check_batch_size(batch, plan, "data-owner")
    except ProtocolError as exc:
        to_model.abort(f"data owner: {exc}")
        raise InputError(str(exc)) from None
    to_model.send("precompute", np.array([sets, batch], np.int64))
    stats = _precompute(to_model, True, plan, bits, he_bits, root, sets, batch, peer, None, t0, ot_engine)
    stats["plan"] = plan_info(plan)
    return stats


def model_owner_precompute(to_data: Channel, plan: Plan, weights: PrivateWeights, root: Path, sets: int, peer: str,
                           ot_engine: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The model owner's side: at most ``sets`` batches into ``root``, as the data owner asks."""
    t0, helpers0 = time.perf_counter(), helper_usage()
    bits, he_bits = send_plan(to_data, plan)
    to_data.step = "waiting for the data owner's precompute request"
    asked, batch = (int(v) for v in to_data.recv("precompute", np.int64, (2,), timeout_s=None))
    try:
        if not 1 <= asked <= sets:
            raise ProtocolError(f"data-owner asked for {asked} precomputed sets: this model owner makes 1..{sets} (--precompute)")
        _check_batch_size(batch, plan, "data-owner")
        if batch == 0:
            raise ProtocolError("data-owner asked for sets of batch size 0")
    except ProtocolError as exc:
        to_data.abort(f"model owner refused the precompute request: {exc}")
        raise
    stats = _precompute(to_data, False, plan, bits, he_bits, root, asked, batch, peer, weights, t0, ot_engine)
    add_helpers(stats, helpers0)
    return stats


def _precompute(ch: Channel, is_data_owner: bool, plan: Plan, bits: int, he_bits: int, root: Path, sets: int, batch: int,
                peer: str, weights: PrivateWeights | None, t0: float, ot_engine: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Steps 3-5 of the module docstring, for either role."""
    role = "data-owner" if is_data_owner else "model-owner"
    t1, b1, r1 = time.perf_counter(), ch.counters.bytes_sent, ch.counters.bytes_recv
    mine = os.urandom(16)
    ch.step = "agreeing on the store id"
    ch.send("store/id", np.frombuffer(mine, np.uint8))
    sid = store_id(mine, bytes(ch.recv("store/id", np.uint8, (16,))), is_data_owner)
    binding = {"store": sid, "role": role, "plan": plan.fingerprint(), "peer": peer, "batch": batch, "bits": bits, "he_bits": he_bits}
    store = Store.create(root, binding)
    try:
        setup: dict[str, float] = {}
        s = _open(ch, is_data_owner, bits, he_bits, setup, ot_engine)
        for k in range(sets):
            ch.step = f"precomputing set {k + 1} of {sets}"
            steps = schedule(plan, batch, k)
            store.add(k, offline_arrays(prepare_offline(s, plan, steps, weights), s.ot, steps, ot_label(sid, k)))
        if is_data_owner:
            ch.send("store/done", np.array([sets], np.int64))
        elif int(ch.recv("store/done", np.int64, (1,))[0]) != sets:
            raise ProtocolError(f"data-owner ended the precompute session without its {sets} sets")
        ch.finish()
        costs = {"offline_s": round(time.perf_counter() - t1, 4), "offline_bytes": ch.counters.bytes_sent - b1,
                 "offline_bytes_recv": ch.counters.bytes_recv - r1, "offline_rounds": s.offline_rounds, "sets": sets, "batch": batch}  # fmt: skip
        store.manifest["precompute"] = costs
        store.save()
    finally:
        store.close()
    stats = _stats(role, t0, [ch], 0, [])
    stats |= costs | {"online_s": 0.0, "online_bytes": 0, "ring_bits": bits, "he_ring_bits": he_bits,
                      "store": {"dir": str(root), "store": sid, "sets": sets, "batch": batch}}  # fmt: skip
    return stats
