"""Model weights as the list of float32 arrays that sites and server exchange.

The federated parameters of a model are its floating-point ``state_dict`` entries in
``state_dict`` order (weights, biases and, with BatchNorm, running statistics). Integer
buffers (``num_batches_tracked``) stay local: they are counters, not averages.

``weighted_average`` is the plaintext FedAvg (McMahan et al. 2017) that SecAgg+ must
reproduce up to its quantisation error; it is the oracle in the aggregation tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from privmed.errors import ProtocolError

__all__ = [
    "add_arrays",
    "check_arrays",
    "federated_names",
    "get_arrays",
    "set_arrays",
    "subtract_arrays",
    "weighted_average",
]


def federated_names(model: nn.Module) -> list[str]:
    """Names of the floating-point ``state_dict`` entries, in order."""
    return [k for k, v in model.state_dict().items() if torch.is_floating_point(v)]


def get_arrays(model: nn.Module) -> list[np.ndarray]:
    """Copies of the federated parameters as float32 arrays (see module docstring)."""
    state = model.state_dict()
    return [state[k].detach().cpu().numpy().astype(np.float32, copy=True) for k in federated_names(model)]


def check_arrays(
    arrays: Sequence[np.ndarray], like: Sequence[np.ndarray], *, what: str
) -> list[np.ndarray]:
    """Return ``arrays`` as float32 after checking count, shapes and finiteness against ``like``.

    Raises ProtocolError naming the first mismatch: peers' arrays are never trusted.
    """
    if len(arrays) != len(like):
        raise ProtocolError(f"{what}: expected {len(like)} arrays, got {len(arrays)}")
    out = []
    for i, (a, ref) in enumerate(zip(arrays, like, strict=True)):
        a = np.asarray(a)
        if a.shape != ref.shape:
            raise ProtocolError(f"{what}: array {i} expected shape {ref.shape}, got {a.shape}")
        if not np.issubdtype(a.dtype, np.floating):
            raise ProtocolError(f"{what}: array {i} expected a float dtype, got {a.dtype}")
        if not np.all(np.isfinite(a)):
            raise ProtocolError(f"{what}: array {i} contains NaN or infinity")
        out.append(a.astype(np.float32, copy=False))
    return out


def set_arrays(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    """Load federated parameters into ``model`` (shapes checked)."""
    names = federated_names(model)
    state = model.state_dict()
    arrays = check_arrays(arrays, [state[k].numpy() for k in names], what="model parameters")
    with torch.no_grad():
        for name, arr in zip(names, arrays, strict=True):
            state[name].copy_(torch.from_numpy(np.ascontiguousarray(arr)))


def subtract_arrays(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(x, np.float32) - np.asarray(y, np.float32) for x, y in zip(a, b, strict=True)]


def add_arrays(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.asarray(x, np.float32) + np.asarray(y, np.float32) for x, y in zip(a, b, strict=True)]


def weighted_average(
    updates: Sequence[Sequence[np.ndarray]], weights: Sequence[float]
) -> list[np.ndarray]:
    """FedAvg: ``sum_i w_i * x_i / sum_i w_i`` per array, computed in float64.

    Preconditions: at least one update, all with the same shapes, weights > 0.
    """
    if not updates or len(updates) != len(weights):
        raise ValueError(f"expected one weight per update, got {len(updates)} and {len(weights)}")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w <= 0):
        raise ValueError(f"weights must be > 0, got {w.tolist()}")
    total = w.sum()
    out = []
    for parts in zip(*updates, strict=True):
        acc = np.zeros(np.shape(parts[0]), dtype=np.float64)
        for wi, x in zip(w, parts, strict=True):
            acc += wi * np.asarray(x, dtype=np.float64)
        out.append((acc / total).astype(np.float32))
    return out
