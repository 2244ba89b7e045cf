"""The HE layers of a batch's offline phase, run beside its OT steps (issue 14).

In ``protocols.prepare_offline`` every linear layer's HE product on the data owner's random
mask A (``he_linear``) and every other offline step (ReLU material, per-channel scales,
Beaver triples: all OT) depend on nothing but the public plan and fresh randomness, and on
none of each other. Run strictly one after the other, the model owner's HE products leave
the data owner idle, and the OT steps' turns leave both idle half the time (DenseNet-121
64x64: 188 s wall for 135 + 44 CPU-seconds on 2 cores). ``overlapped`` reorders them:

1. Data owner: encodes, encrypts and sends the mask of every HE layer of the batch, in the
   schedule's order (``he_linear.send_inputs``). Model owner: receives each layer's
   ciphertexts (``recv_inputs``, lengths bounded) and hands the layer to a worker thread.
2. Model owner's worker thread: ``he_linear.evaluate`` layer by layer (products with the
   weight plaintexts, masks R, Enc_pk(0), modulus switch, flooding) into reply arrays and its
   shares; it uses no channel, only this party's SEAL objects and each layer's own PRG
   stream. Meanwhile both parties' main threads run the OT steps (``ot_steps``) in the
   schedule's order.
3. Model owner: sends each layer's replies in order as the worker finishes it; data owner:
   receives and decrypts them (``recv_outputs``, shape and residues checked).

Rounds: the HE exchange of the whole batch is one round (one per layer before); the OT steps'
rounds are unchanged. Bytes: unchanged, the same messages in another order.

Security (semi-honest, as ``he_linear`` and the OT protocols): every message is exactly the
one ``he_linear`` or the OT protocol sends, computed from the same inputs; only the order of
independent protocol instances changes, and that order is the public schedule's. Each
instance uses its own randomness (A and the model owner's R and flooding noise from their
own stream keys, the OT session's pads), so a party's view is the views of independent
instances side by side, and the simulator runs each instance's simulator in this order
(parallel composition of semi-honest protocols on independent inputs).

Where the products run: SEAL keeps the GIL during its calls (measured here: two threads of
SEAL products take the time of one), so a worker thread only fills the model owner's waits
(it used one core fully: DenseNet-121 64x64 in 33 s for 26.5 model-owner CPU-seconds). From
``HELPER_MIN_PRODUCTS`` products per batch the products run in a spawned helper process
instead (``HEHelper``), on a core of their own: the model owner's process keeps drawing every
layer's randomness (``he_linear.draw``) and sends every message; the helper gets the public
shapes, the data owner's ciphertexts, the lowered weights and the drawn masks and noise, and
returns the replies. Spawning re-imports the launching script as ``__mp_main__`` (as any
``multiprocessing`` spawn does), so a script that calls the model owner's side in process
needs the usual ``if __name__ == "__main__"`` guard; ``privmed party`` has one.
Every wait has a deadline: a layer's replies are awaited at most the channel's receive
deadline. Memory: the model owner holds the batch's input ciphertexts (about 197 kB each,
seeded) until evaluated and the replies until sent; the helper holds one layer at a time.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from privmed.crypto.prg import Stream
from privmed.errors import PrivmedError
from privmed.mpc.twoparty.he_linear import (
    HELayer,
    HESession,
    draw,
    evaluate,
    he_layer,
    model_owner_share,
    recv_inputs,
    recv_outputs,
    replies_of,
    send_inputs,
)
from privmed.mpc.twoparty.seal_io import HEParams, SealIO
from privmed.net.channel import Channel

HELPER_MIN_PRODUCTS = 2000  # below this many HE products per batch a helper process costs more than it saves
ORPHAN_CHECK_S = 1.0  # how often a helper checks that the model owner's process still exists


@dataclass(frozen=True)
class ModelOwnerLayer:
    """The model owner's private part of one HE layer: weights, their bound, its PRG stream."""

    weight: np.ndarray
    weight_bits: int
    stream: Stream


def overlapped(
    he: HESession,
    ch: Channel,
    layers: list[HELayer],
    ot_steps: Callable[[], None],
    masks: list[np.ndarray] | None = None,
    private: list[ModelOwnerLayer] | None = None,
    helper: bool | None = None,
) -> list[np.ndarray]:
    """This party's shares of L(W, A) for every layer (see the module docstring), with
    ``ot_steps`` (the batch's OT steps, run by the caller's thread) between steps 1 and 3.
    The data owner passes ``masks`` (A per layer), the model owner ``private``; the model
    owner's products run in a helper process (``HEHelper``) if ``helper``, else in a thread;
    None: a helper from ``HELPER_MIN_PRODUCTS`` products on."""
    if he.is_data_owner:
        if masks is None or len(masks) != len(layers):
            raise ValueError("overlapped: the data owner passes one mask per layer")
        for layer, mask in zip(layers, masks, strict=True):
            send_inputs(he, ch, layer, mask)
        ot_steps()
        return [recv_outputs(he, ch, layer) for layer in layers]
    if private is None or len(private) != len(layers):
        raise ValueError("overlapped: the model owner passes its weights and a stream per layer")
    if helper is None:
        helper = sum(len(ins) for layer in layers for _, ins in layer.plan) >= HELPER_MIN_PRODUCTS
    if helper:
        return _in_helper(he, ch, layers, ot_steps, private)
    todo: queue.Queue[tuple[int, list[bytes]] | None] = queue.Queue()
    done: queue.Queue[tuple[np.ndarray, np.ndarray] | BaseException] = queue.Queue()
    stop = threading.Event()

    def worker() -> None:
        try:
            while (job := todo.get()) is not None and not stop.is_set():
                i, blobs = job
                done.put(evaluate(he, layers[i], blobs, private[i].weight, private[i].weight_bits, private[i].stream))
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread, raised there
            done.put(exc)

    thread = threading.Thread(target=worker, name="he-offline", daemon=True)
    thread.start()
    try:
        for i, layer in enumerate(layers):
            todo.put((i, recv_inputs(he, ch, layer)))
        todo.put(None)
        ot_steps()
        shares = []
        for layer in layers:
            try:
                result = done.get(timeout=ch.timeout_s)
            except queue.Empty:
                raise PrivmedError(f"{layer.label}: the HE products took longer than the {ch.timeout_s:.0f} s deadline") from None
            if isinstance(result, BaseException):
                raise result
            replies, share = result
            ch.send(f"{layer.label}/he/y", replies)
            shares.append(share)
        return shares
    finally:
        stop.set()
        todo.put(None)  # a worker waiting for a job ends; one mid-layer ends after it


def _in_helper(he: HESession, ch: Channel, layers: list[HELayer], ot_steps: Callable[[], None],
               private: list[ModelOwnerLayer]) -> list[np.ndarray]:  # fmt: skip
    """The model owner's side of ``overlapped`` with its products in an ``HEHelper`` process:
    this process receives each layer's ciphertexts, draws the layer's masks and flooding noise
    from its own stream (``he_linear.draw``: the helper draws no protocol randomness) and hands
    both over; then the OT steps; then the replies, in order."""
    if he.public_key is None:
        raise ValueError("overlapped: the model owner's HE session has no public key for a helper")
    pool = HEHelper(he.io.params, he.public_key)
    try:
        pending, shares = [], []
        for layer, mine in zip(layers, private, strict=True):
            blobs = recv_inputs(he, ch, layer)
            w, masks, noise = draw(he, layer, mine.weight, mine.weight_bits, mine.stream)
            pending.append(pool.submit(layer, blobs, layer.low.w_map(w), masks, noise))
            shares.append(model_owner_share(he, layer, masks, w))
        ot_steps()
        for layer, future in zip(layers, pending, strict=True):
            try:
                replies = future.result(timeout=ch.timeout_s)
            except concurrent.futures.TimeoutError:
                raise PrivmedError(f"{layer.label}: the HE products took longer than the {ch.timeout_s:.0f} s deadline") from None
            ch.send(f"{layer.label}/he/y", replies)
        return shares
    finally:
        pool.close()


class HEHelper:
    """The model owner's HE products (``he_linear.replies_of``) in one child process, so that
    they use a core of their own: SEAL keeps the GIL, so a thread shares the model owner's.

    The child is spawned (a fresh interpreter, no copy of this process's threads or keys), its
    SEAL context rebuilt from the public parameters and the data owner's public key; it gets
    each layer's public shapes, the data owner's ciphertexts, the lowered weights and the
    masks and noise drawn here, and returns the reply array. It holds the weights only while
    it runs, and it ends with the offline phase (``close``) or, if this process is killed,
    within ``ORPHAN_CHECK_S`` (it watches its parent: an idle pool worker would wait forever).
    Enc_pk(0) inside it draws from SEAL's own OS-seeded PRNG, as in this process.
    It is the model owner's own process (same host and user, a local pipe), so no party and
    no network message is added: the security argument of ``overlapped`` is unchanged.
    """

    def __init__(self, params: HEParams, public_key: np.ndarray) -> None:
        context = multiprocessing.get_context("spawn")
        self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=_helper_start, initargs=(params, public_key))

    def submit(self, layer: HELayer, blobs: list[bytes], w_low: np.ndarray, masks: np.ndarray,
               noise: np.ndarray) -> concurrent.futures.Future[np.ndarray]:  # fmt: skip
        shapes = (layer.label, layer.kind, layer.spec, layer.x_shape, layer.w_shape)
        return self._pool.submit(_helper_replies, shapes, blobs, w_low, masks, noise)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


# The helper process's own HE session, set once by ``_helper_start`` in that process (the
# pool's initializer); never set in the model owner's process.
_HELPER_SESSION: dict[str, HESession] = {}


def _helper_start(params: HEParams, public_key: np.ndarray) -> None:
    parent = os.getppid()

    def orphaned() -> None:  # the pool's pipe does not end an idle helper whose parent was killed
        while os.getppid() == parent:
            time.sleep(ORPHAN_CHECK_S)
        os._exit(1)

    threading.Thread(target=orphaned, name="he-helper-parent", daemon=True).start()
    io = SealIO(params)
    _HELPER_SESSION["he"] = HESession(io, False, io.s.Encryptor(io.ctx, io.public_key(public_key)), public_key=public_key)


def _helper_replies(shapes: tuple[Any, ...], blobs: list[bytes], w_low: np.ndarray, masks: np.ndarray, noise: np.ndarray) -> np.ndarray:
    he = _HELPER_SESSION["he"]
    return replies_of(he, he_layer(he, *shapes), blobs, w_low, masks, noise)
