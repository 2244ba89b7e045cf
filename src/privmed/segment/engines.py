"""What segmentation adds to the shared engines (``privmed.engines``): the batch size that keeps
a party's memory bounded, and per-class probabilities from the model's outputs.

The pipeline runs the network through ``privmed.engines.SecureEngine`` (all N slices or
patches stream through ONE session in batches of ``auto_chunk``: the masked weights are sent
once, and memory holds the secret shares of one batch's activations at a time, never the
whole volume's; the outputs are revealed to the data owner only) or ``PlaintextEngine``
(onnxruntime, for comparison: INSECURE by nature).

``to_probabilities`` turns outputs into per-class probabilities ``(N, K', ...)`` with
K' >= 2 (a one-channel Sigmoid becomes background/foreground), applying the final activation
in clear when the ONNX graph ends without one.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from privmed.errors import InputError
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


def auto_chunk(model: SegmentationModel, n: int) -> int:
    """Samples per batch keeping a party's batch memory under ``BATCH_MEMORY_BYTES`` (at least 1)."""
    if model.work_elements > 0:
        fit = BATCH_MEMORY_BYTES // (BYTES_PER_WORK_ELEMENT * model.work_elements)
    else:
        fit = CHUNK_ELEMENTS // max(1, math.prod(int(s) for s in model.input_shape))
    return max(1, min(n, int(fit)))


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
