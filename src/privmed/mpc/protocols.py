"""The protocol set a secure executor calls, run for real or recorded.

``Online`` runs the protocols of ``mpc.linear``, ``mpc.compare`` and ``mpc.arith`` for one
party; ``Schedule`` runs nothing and hands each correlation request to a callback (the dealer
serves it) and returns zeros of the right shape. Both number a node's requests 0, 1, 2, ... in
call order and derive every label and ``StreamKey`` the same way, so a party and the dealer
walking the same plan with the same executor (``privmed.runtime.backend.SecureBackend``)
agree on the order and the keys of all correlations by construction: a new op is written
once, as calls to this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np

from privmed.crypto.prg import StreamKey
from privmed.mpc import arith, compare, linear
from privmed.mpc.correlation.requests import (
    LinearSpec,
    NonlinearSpec,
    ProductSpec,
    Purpose,
    Request,
    ThresholdSpec,
)
from privmed.mpc.party import Party
from privmed.ring.linalg import ConvSpec

U64 = np.uint64


class Protocols(ABC):
    """Secure operations on this party's shares, each numbered within the current node."""

    def __init__(self, batch_index: int, ring_bits: int = 64) -> None:
        self.batch_index = batch_index
        self.ring_bits = ring_bits
        self.node = 0
        self._step = 0

    def at_node(self, index: int) -> None:
        """The following calls belong to the plan's node number ``index``."""
        self.node, self._step = index, 0

    def _request(self, purpose: Purpose, **spec: object) -> Request:
        step = self._step
        self._step += 1
        key = StreamKey(self.batch_index, self.node, purpose, step)
        return Request(f"b{self.batch_index}:{self.node}/{step}", key, self.node, **spec, ring=self.ring_bits)  # type: ignore[arg-type]

    def linear(self, x: np.ndarray, kind: str, conv: ConvSpec | None, w_shape: tuple[int, ...], out_shape: tuple[int, ...],
               weight: np.ndarray | None = None, weight_bits: int | None = None, bias: np.ndarray | None = None) -> np.ndarray:
        """Shares of L(W, x) + b with the model owner's private W, b (``mpc.linear``)."""
        spec = LinearSpec(kind, conv, tuple(w_shape), tuple(x.shape), tuple(out_shape))
        return self._linear(self._request(Purpose.LINEAR, linear=spec), x, weight, weight_bits, bias)

    def truncate(self, x: np.ndarray, shift: int) -> np.ndarray:
        """Shares of x >> shift, exact to -1..+2 ulp (``mpc.compare.truncate``)."""
        return self._truncate(self._request(Purpose.NONLINEAR, nonlinear=NonlinearSpec(x.size, shift)), x)

    def relu(self, x: np.ndarray, shift: int, bits: int, drop: int) -> tuple[np.ndarray, np.ndarray]:
        """Shares of (ReLU(x >> shift), x >> shift) (``mpc.compare.relu``)."""
        spec = NonlinearSpec(x.size, shift, bits, drop, True)
        return self._relu(self._request(Purpose.NONLINEAR, nonlinear=spec), x)

    def sign(self, x: np.ndarray, bits: int) -> np.ndarray:
        """Arithmetic shares of [x >= 0] (``mpc.compare.sign``)."""
        spec = NonlinearSpec(x.size, 0, bits, 0, True, select=False)
        return self._sign(self._request(Purpose.NONLINEAR, nonlinear=spec), x)

    def sign_thresholds(self, x: np.ndarray, thresholds: np.ndarray, bits: int) -> np.ndarray:
        """Arithmetic shares of [x >= t_j] for public ring-encoded thresholds t (k,), shape
        (k, *x.shape) (``mpc.compare.sign_thresholds``: one opening of x for all k)."""
        return self._sign_thresholds(x, thresholds, bits)

    def _sign_thresholds(self, x: np.ndarray, thresholds: np.ndarray, bits: int) -> np.ndarray:
        """For protocol sets without the shared-opening correlation: one comparison per
        threshold on x - t_j (the data owner subtracts the public t_j)."""
        diffs = np.repeat(x[None], thresholds.size, axis=0)  # one copy of x per threshold, each with its own mask
        if getattr(self, "is_data_owner", False):
            diffs = diffs - thresholds.reshape(-1, *([1] * x.ndim))
        return self.sign(np.ascontiguousarray(diffs), bits).reshape(thresholds.size, *x.shape)

    def _threshold_request(self, x: np.ndarray, thresholds: np.ndarray, bits: int) -> Request:
        return self._request(Purpose.NONLINEAR, thresholds=ThresholdSpec(x.size, thresholds.size, bits))

    def multiply(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Shares of x * y, y broadcast over x (``mpc.arith.multiply``)."""
        return self._multiply(self._request(Purpose.PRODUCT, product=ProductSpec(tuple(x.shape), tuple(y.shape))), x, y)

    def einsum(self, equation: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Shares of einsum(equation, x, y), every axis (batch included) named (``mpc.arith.einsum``)."""
        spec = ProductSpec(tuple(x.shape), tuple(y.shape), equation=equation)
        return self._einsum(self._request(Purpose.PRODUCT, product=spec), x, y)

    def square(self, x: np.ndarray) -> np.ndarray:
        """Shares of x * x (``mpc.arith.square``)."""
        return self._square(self._request(Purpose.PRODUCT, product=ProductSpec(tuple(x.shape), square=True)), x)

    @abstractmethod
    def _linear(self, req: Request, x: np.ndarray, weight: np.ndarray | None, weight_bits: int | None, bias: np.ndarray | None) -> np.ndarray: ...
    @abstractmethod
    def _truncate(self, req: Request, x: np.ndarray) -> np.ndarray: ...
    @abstractmethod
    def _relu(self, req: Request, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...
    @abstractmethod
    def _sign(self, req: Request, x: np.ndarray) -> np.ndarray: ...
    @abstractmethod
    def _multiply(self, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...
    @abstractmethod
    def _square(self, req: Request, x: np.ndarray) -> np.ndarray: ...
    @abstractmethod
    def _einsum(self, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...
    @abstractmethod
    def reveal(self, x: np.ndarray) -> np.ndarray | None:
        """Open x to the data owner only (``mpc.compare.reveal_to_data_owner``)."""


class Online(Protocols):
    """The protocols run by one computing party."""

    def __init__(self, party: Party, batch_index: int, masked_weights: dict[str, np.ndarray] | None = None) -> None:
        super().__init__(batch_index, party.ring_bits)
        self.p = party
        self.masked_weights = {} if masked_weights is None else masked_weights

    @property
    def is_data_owner(self) -> bool:
        return self.p.is_data_owner

    def _linear(self, req: Request, x: np.ndarray, weight: np.ndarray | None, weight_bits: int | None, bias: np.ndarray | None) -> np.ndarray:
        return linear.private_linear(self.p, req, x, weight, weight_bits, bias, self.masked_weights)

    def _truncate(self, req: Request, x: np.ndarray) -> np.ndarray:
        return compare.truncate(self.p, req, x)

    def _relu(self, req: Request, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return compare.relu(self.p, req, x)

    def _sign(self, req: Request, x: np.ndarray) -> np.ndarray:
        return compare.sign(self.p, req, x)

    def _multiply(self, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return arith.multiply(self.p, req, np.ascontiguousarray(x), np.ascontiguousarray(y))

    def _square(self, req: Request, x: np.ndarray) -> np.ndarray:
        return arith.square(self.p, req, np.ascontiguousarray(x))

    def _einsum(self, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return arith.einsum(self.p, req, np.ascontiguousarray(x), np.ascontiguousarray(y))

    def _sign_thresholds(self, x: np.ndarray, thresholds: np.ndarray, bits: int) -> np.ndarray:
        req = self._threshold_request(x, thresholds, bits)
        return compare.sign_thresholds(self.p, req, np.ascontiguousarray(x), thresholds)

    def reveal(self, x: np.ndarray) -> np.ndarray | None:
        return compare.reveal_to_data_owner(self.p, f"b{self.batch_index}:{self.node}", x)


class Schedule(Protocols):
    """Runs no protocol: hands every request to ``serve`` in consumption order (the dealer)
    and returns zeros of the shape the protocol would return."""

    is_data_owner = False

    def __init__(self, batch_index: int, serve: Callable[[Request], None], ring_bits: int = 64) -> None:
        super().__init__(batch_index, ring_bits)
        self.serve = serve

    def _linear(self, req: Request, x: np.ndarray, weight: np.ndarray | None, weight_bits: int | None, bias: np.ndarray | None) -> np.ndarray:
        self.serve(req)
        assert req.linear is not None
        return np.zeros(req.linear.out_shape, U64)

    def _truncate(self, req: Request, x: np.ndarray) -> np.ndarray:
        self.serve(req)
        return np.zeros(x.shape, U64)

    def _relu(self, req: Request, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.serve(req)
        return np.zeros(x.shape, U64), np.zeros(x.shape, U64)

    _sign = _truncate

    def _multiply(self, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.serve(req)
        return np.zeros(x.shape, U64)

    _square = _truncate

    def _einsum(self, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.serve(req)
        assert req.product is not None
        return np.zeros(req.product.out_shape, U64)

    def _sign_thresholds(self, x: np.ndarray, thresholds: np.ndarray, bits: int) -> np.ndarray:
        self.serve(self._threshold_request(x, thresholds, bits))
        return np.zeros((thresholds.size, *x.shape), U64)

    def reveal(self, x: np.ndarray) -> np.ndarray | None:
        return None
