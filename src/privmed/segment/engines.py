"""Two ways to run the network on a stack of slices or patches: secure (three parties) or plaintext.

Both take the same float32 inputs ``(N, C, *spatial)`` built by ``pipeline`` and return the
model's outputs ``(N, K, *spatial)`` plus costs, so everything before and after the network is
shared code and the two paths differ only here.

- ``SecureEngine``: ``privmed.runtime.launch.run_local_session`` -- data owner, model owner
  and dealer as three processes over mutual TLS. All N inputs stream through ONE session in
  batches of ``chunk``: the masked weights are sent once, and memory holds the secret shares
  of one batch's activations at a time, never the whole volume's. The outputs are revealed
  to the data owner only (the model owner and dealer learn shapes, nothing else).
- ``PlaintextEngine``: onnxruntime on the same inputs, for comparison. INSECURE by nature: the
  party running it holds the weights and the image in clear.

``to_probabilities`` turns outputs into per-class probabilities ``(N, K', ...)`` with
K' >= 2 (a one-channel Sigmoid becomes background/foreground), applying the final activation
in clear when the ONNX graph ends without one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from privmed.errors import InputError
from privmed.runtime.stats import BatchCost, SessionStats
from privmed.segment.model import SegmentationModel

log = logging.getLogger(__name__)

# Auto batch size: a party's peak memory grows by about BYTES_PER_WORK_ELEMENT per work
# element (model.work_elements) per sample in a batch (measured: +103 MB per 16^3 patch of a
# small 3-D U-Net with 1.77 M work elements, +7 MB per 32 x 32 slice with 0.15 M; see
# docs/segment.md). Batches are sized to stay under BATCH_MEMORY_BYTES on top of a party's
# ~0.2 GB base; one sample always runs, however large.
BYTES_PER_WORK_ELEMENT = 64
BATCH_MEMORY_BYTES = 1 << 30
CHUNK_ELEMENTS = 1 << 16  # fallback when shape inference gives no estimate: input elements per batch


@dataclass
class EngineRun:
    """Outputs of one engine run and what it cost.

    ``stats`` for the secure engine is ``run_local_session``'s ``SessionStats``; for the
    plaintext engine the same record with wall time and batches only (no bytes, no rounds).
    """

    engine: str
    outputs: np.ndarray
    stats: SessionStats


class Engine(Protocol):
    name: str

    def run(self, model: SegmentationModel, inputs: np.ndarray) -> EngineRun: ...


def auto_chunk(model: SegmentationModel, n: int) -> int:
    """Samples per batch keeping a party's batch memory under ``BATCH_MEMORY_BYTES`` (at least 1)."""
    if model.work_elements > 0:
        fit = BATCH_MEMORY_BYTES // (BYTES_PER_WORK_ELEMENT * model.work_elements)
    else:
        fit = CHUNK_ELEMENTS // max(1, math.prod(int(s) for s in model.input_shape))
    return max(1, min(n, int(fit)))


@dataclass
class SecureEngine:
    """Secure inference, three local processes over TCP + mutual TLS 1.3.

    Parameters
    ----------
    chunk : samples per batch in the session (None: ``auto_chunk``, about 1 GB per party).
    timeout_s : deadline of each receive; ``run_local_session`` stops the whole session
        after 20 x this, so long volumes need a larger value.
    progress : per-layer events from the data owner (``privmed.cli.progress.LayerProgress``).
    calibration : the model owner's calibration input (.npy) for the fixed-point scale; None
        lets the compiler use a standard-normal input.
    expect_plan : the data owner refuses any plan whose SHA-256 fingerprint differs.
    """

    chunk: int | None = None
    timeout_s: float = 120.0
    progress: Callable[[dict[str, Any]], None] | None = None
    calibration: Path | None = None
    workdir: Path | None = None
    expect_plan: str | None = None
    name: str = "secure"

    def run(self, model: SegmentationModel, inputs: np.ndarray) -> EngineRun:
        from privmed.runtime.launch import run_local_session

        if self.chunk is not None and self.chunk < 1:
            raise InputError(f"--chunk {self.chunk}: expected a positive batch size")
        chunk = self.chunk or auto_chunk(model, len(inputs))
        log.info("secure session: %d inputs %s in batches of %d", len(inputs), model.input_shape, chunk)
        result = run_local_session(
            model.path,
            np.ascontiguousarray(inputs, dtype=np.float32),
            timeout_s=self.timeout_s,
            workdir=self.workdir,
            progress=self.progress,
            calibration=self.calibration,
            input_shape=list(model.input_shape),
            chunk=chunk,
            expect_plan=self.expect_plan,
        )
        return EngineRun(self.name, result.outputs, result.stats)


@dataclass
class PlaintextEngine:
    """onnxruntime on the data owner's machine (for comparison only: needs the weights in clear)."""

    threads: int = 1
    name: str = "plaintext"

    def run(self, model: SegmentationModel, inputs: np.ndarray) -> EngineRun:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = max(1, self.threads)
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        t0 = time.perf_counter()
        session = ort.InferenceSession(str(model.path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        batch_dim = session.get_inputs()[0].shape[0]
        step = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else 1
        outs: list[np.ndarray] = []
        batches: list[BatchCost] = []
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        for i in range(0, len(x), step):
            tb = time.perf_counter()
            outs.append(np.asarray(session.run(None, {name: x[i : i + step]})[0]))
            n = len(x[i : i + step])
            batches.append(BatchCost(len(batches), n, round(time.perf_counter() - tb, 6)))
        wall = time.perf_counter() - t0
        out = np.concatenate(outs) if outs else np.zeros((0, model.num_outputs, *model.side), np.float32)
        return EngineRun(self.name, out, SessionStats(wall_s=round(wall, 3), online_s=round(wall, 3), batches=batches))


def to_probabilities(outputs: np.ndarray, final: str) -> np.ndarray:
    """Per-class probabilities ``(N, K', ...)``, K' >= 2, from model outputs ``(N, K, ...)``.

    ``final`` is the graph's last op: "Softmax" (outputs already sum to 1 over K), "Sigmoid"
    (K = 1: foreground probability p becomes [1 - p, p]) or "none" (logits: a softmax over K,
    or a sigmoid for K = 1, computed here in float64 by the data owner).
    """
    out = np.asarray(outputs, dtype=np.float64)
    k = out.shape[1]
    if final == "none":
        if k == 1:
            out = 1.0 / (1.0 + np.exp(-out))
        else:
            out = np.exp(out - out.max(axis=1, keepdims=True))
            out /= out.sum(axis=1, keepdims=True)
    elif final == "Sigmoid" and k > 1:
        raise InputError(f"a {k}-channel Sigmoid output is multi-label; expected Softmax over classes or one Sigmoid channel")
    if k == 1:
        out = np.concatenate([1.0 - out, out], axis=1)
    return out.astype(np.float32)
