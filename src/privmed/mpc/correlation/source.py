"""Where a party's correlated randomness comes from.

``CorrelationSource`` is the interface the protocols see. ``DealerSource`` implements it from a
seed plus the dealer's corrections: the dealer is a third party that only produces
input-independent randomness (it never sees a share of the image, the weights or the output).
At session start it sends a fresh 16-byte seed to each party over mutual TLS; everything a
party can expand from its own seed it expands locally, and only the model owner (party 1)
receives correction terms, one to three messages per request, each checked for its exact
shape before use. A dealer-free source (OT extension / HE, as in CrypTFlow2 and Cheetah)
implements the same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from privmed.crypto.prg import PRG
from privmed.mpc.correlation.expand import (
    LinearShares,
    NonlinearShares,
    ProductShares,
    arith_fields,
    expand_linear,
    expand_nonlinear,
    expand_product,
    expand_thresholds,
)
from privmed.mpc.correlation.requests import Request, ands_per_level, packed_len
from privmed.net.channel import Channel

U64 = np.uint64


class CorrelationSource(ABC):
    """Where a party's correlated randomness comes from (dealer now, dealer-free later)."""

    @abstractmethod
    def linear(self, req: Request) -> LinearShares: ...

    @abstractmethod
    def nonlinear(self, req: Request) -> NonlinearShares: ...

    @abstractmethod
    def product(self, req: Request) -> ProductShares: ...

    @abstractmethod
    def thresholds(self, req: Request) -> NonlinearShares: ...


class DealerSource(CorrelationSource):
    """Party side of the dealer: expand from the seed, receive corrections (party 1 only)."""

    def __init__(self, index: int, seed: bytes, dealer: Channel | None) -> None:
        self.index = index
        self.prg = PRG(seed)
        self.dealer = dealer

    def _from_dealer(self) -> Channel:
        if self.dealer is None:
            raise ValueError("the model owner's correlation source needs its channel to the dealer")
        return self.dealer

    def linear(self, req: Request) -> LinearShares:
        sh = expand_linear(self.prg, req, self.index)
        if self.index == 1:
            assert req.linear is not None
            sh.product = self._from_dealer().recv_ring(f"{req.label}/C", req.linear.out_shape, req.ring)
        return sh

    def product(self, req: Request) -> ProductShares:
        sh = expand_product(self.prg, req, self.index)
        if self.index == 1:
            assert req.product is not None
            sh.c = self._from_dealer().recv_ring(f"{req.label}/P", req.product.out_shape, req.ring)
        return sh

    def nonlinear(self, req: Request) -> NonlinearShares:
        spec = req.nonlinear
        assert spec is not None
        sh = expand_nonlinear(self.prg.stream(req.key), self.index, spec, req.ring)
        if self.index == 0:
            return sh
        dealer = self._from_dealer()
        wide, msb = arith_fields(spec)
        if wide:
            arith = dealer.recv_ring(f"{req.label}/A", (len(wide), spec.n), req.ring)
            for i, name in enumerate(wide):
                setattr(sh, name, arith[i])
        if msb:  # needed mod 2^shift only (``arith_fields``)
            low = dealer.recv_ring(f"{req.label}/M", (len(msb), spec.n), spec.shift)
            for i, name in enumerate(msb):
                setattr(sh, name, low[i])
        levels = ands_per_level(spec.chunks)
        nb = packed_len(spec.n)
        total = (nb if spec.relu else 0) + sum(levels) * nb
        flat = dealer.recv(f"{req.label}/B", np.uint8, (total,))
        pos = 0
        if spec.relu:
            sh.lt_tables = dealer.recv(f"{req.label}/T", np.uint16, (spec.chunks, spec.n))
            sh.e_mask, pos = flat[:nb], nb
        _fill_triples(sh, flat, pos, levels, nb)
        return sh

    def thresholds(self, req: Request) -> NonlinearShares:
        spec = req.thresholds
        assert spec is not None
        sh = expand_thresholds(self.prg.stream(req.key), self.index, spec)
        if self.index == 0:
            return sh
        dealer = self._from_dealer()
        kn, nb = spec.k * spec.n, packed_len(spec.k * spec.n)
        sh.c_hat = dealer.recv_ring(f"{req.label}/A", (kn,), req.ring)
        sh.lt_tables = dealer.recv(f"{req.label}/T", np.uint16, (spec.chunks, spec.n))
        levels = ands_per_level(spec.chunks)
        flat = dealer.recv(f"{req.label}/B", np.uint8, (nb + sum(levels) * nb,))
        sh.e_mask = flat[:nb]
        _fill_triples(sh, flat, nb, levels, nb)
        return sh


def _fill_triples(sh: NonlinearShares, flat: np.ndarray, pos: int, levels: list[int], nb: int) -> None:
    """The dealer's AND-triple corrections (packed, ``levels[i]`` gates of ``nb`` bytes per tree
    level, from ``flat[pos:]``) as the z of the seeded triples."""
    for lvl, k in enumerate(levels):
        a, b, _ = sh.triples[lvl]
        sh.triples[lvl] = (a, b, flat[pos : pos + k * nb].reshape(k, nb))
        pos += k * nb
