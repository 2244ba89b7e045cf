"""``TwoPartyOnline``: the executor's protocol set (``privmed.mpc.protocols.Protocols``) run by
the data owner and the model owner alone, with no dealer (issue 14).

Two rings, chosen from the public plan by both parties (``privmed.runtime.twoparty.check_two_party``):

- **Narrow** (plans without products of two secrets): shares over Z_2^l, l = ``ring_bits``
  (the widest comparison width ``bits`` in the plan, |x| < 2^bits, plus 2 because truncation
  needs |x| < 2^(l-2)), carried in the executor's uint64 arrays. Every public op of
  ``SecureBackend`` (sums, public scalings, pooling sums, upscaling, the LeakyReLU/PReLU
  combinations) is linear with integer coefficients, so it commutes with Z_2^64 -> Z_2^l (a
  ring homomorphism); every protocol reduces its inputs mod 2^l first and the data owner
  sign-extends the revealed value. l <= ``MAX_RING_BITS``, the HE plaintext modulus with room
  for noise flooding (``he_encoding.flood_bits``). Cheapest: comparisons, HE and truncations
  all at l bits.
- **Wide** (products of two secrets, or comparisons wider than that): shares over Z_2^64 as in
  the dealer mode (same |x| < 2^62 contract, so the compiler's bounds for norms and
  polynomials hold unchanged). HE layers run at ``MAX_RING_BITS`` and their results are
  extended back (``compare.extend``, one COT per element); a ReLU runs in Z_2^(bits+2) and is
  extended back; a sign in Z_2^(bits+2); truncation at 64 bits; products by Beaver triples.

Either way, values that meet no comparison but go through HE (linear outputs) are covered by
the model owner's calibration report, checked in ``check_headroom`` before the plan is sent.

Per batch, an input-independent offline phase (``prepare_offline``) takes the batch's secret
ops as recorded by ``Recorder`` walking the plan with the online executor
(``privmed.runtime.twoparty.schedule``: order and shapes come from the plan, never from a
hand-kept copy) and makes, for every linear layer, Cheetah's HE product on a fresh random
mask A of the data owner (a per-channel scale by vector COTs instead, ``scale``); for every ReLU, the OT material of ``offline.relu_offline``; for
every product, a Beaver triple by Gilboa OT (``products.product_offline``). The online walk:

- ``linear``: ``he_linear.online_linear`` (data owner sends E = x0 - A, 1 round, |x| ring
  elements), wide mode extends the result (2 rounds), the model owner adds its bias. Why a
  mask offline and not the HE product on the masked input online: the HE work (the model
  owner's NTTs and products, ~95 % of a layer's cost) leaves the critical path and can run
  before the image exists; online a layer costs one message of |x| ring elements, the dealer
  mode's message flow with W itself in place of W - B. The price is that message (8 |x|
  bytes), which the online HE variant would not send.
- ``relu``: ``offline.relu_online`` (CrypTFlow2's DReLU + MUX on Beaver-precomputed OTs),
  comparing bits [drop, ring-1) as the dealer mode does, then one ``compare.truncate`` of
  (ReLU(x), x) together (ReLU(x) >> s = ReLU(x >> s) for floor shifts): 4 + ceil(log2 m)
  rounds, + 2 with a shift, + 2 for the extension in wide mode.
- ``truncate``: ``compare.truncate`` (SiRNN, known MSB: one COT, 2 rounds, floor or floor - 1,
  no probabilistic wrap while |x| < 2^(ring-2)).
- ``sign``: ``compare.drelu`` then ``compare.b2a``.
- ``multiply`` / ``square``: ``products.product_online`` (1 round, |x| + |y| elements each).
  ``einsum`` (attention's matrix products of two secrets): the same opening with a matrix
  triple made by expansion (``products.einsum_offline``: cost grows with the product of every
  axis size, so einsums past ``MAX_EINSUM_EXPANSION`` are refused).
- ``reveal``: the model owner sends its share (1 message, |x| elements); the data owner checks
  every element is in the ring.

Security (semi-honest data owner or model owner, no third party): sequential composition of
the protocols above, each simulatable from the corrupted party's input and output (see their
docstrings): HE replies are masked and noise-flooded, E is masked by a one-time uniform A the
model owner only saw encrypted, OT messages are masked by OT pads, Beaver openings by triples
used once. The model owner's view is simulated without the output (it receives nothing at
reveal).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from privmed.crypto.prg import PRG
from privmed.errors import ModelError, ProtocolError
from privmed.ir.plan import Plan, PrivateWeights
from privmed.mpc.correlation.requests import Request
from privmed.mpc.protocols import Protocols
from privmed.mpc.twoparty import compare
from privmed.mpc.twoparty.compare import ring_mask
from privmed.mpc.twoparty.he_linear import HESession, he_layer, he_setup, online_linear
from privmed.mpc.twoparty.he_offline import ModelOwnerLayer, overlapped
from privmed.mpc.twoparty.offline import ReluMaterial, relu_offline, relu_online
from privmed.mpc.twoparty.ot import OTSession, ot_setup
from privmed.mpc.twoparty.products import (
    ProductMaterial,
    einsum_offline,
    product_offline,
    product_online,
)
from privmed.mpc.twoparty.scale import channel_scale_shares
from privmed.mpc.twoparty.seal_io import HEParams, SealIO
from privmed.mpc.twoparty.silent_ot import FERRET_MEDIUM, attach_ferret
from privmed.net.channel import Channel
from privmed.ring.fixed import sign_extend

U64 = np.uint64
MIN_RING_BITS = 38
MAX_RING_BITS = 43  # t = 2^l with room for flooding 17-bit weights over 64 channel blocks (he_encoding.flood_bits)
MAX_EINSUM_EXPANSION = 1 << 20  # elements of an einsum's full expansion: 1.5 GB of OT per party at 2^20


class ProductsNotSupported(ProtocolError):
    """A matrix product of two secret tensors too large for triples by expansion."""


def ring_bits(plan: Plan) -> int:
    """The two-party ring width l from the public plan: widest comparison + 2 (see module doc)."""
    widths = [int(n.attrs["bits"]) for n in plan.nodes if "bits" in n.attrs]
    widths += [int(n.attrs["sign_bits"]) for n in plan.nodes if "sign_bits" in n.attrs]
    return max([MIN_RING_BITS, *(w + 2 for w in widths)])


def check_headroom(plan: Plan, bits: int) -> None:
    """Model owner: every calibrated value (with the compiler's margin) fits |x| < 2^(l-2), l
    the HE ring. The report keeps one figure for the whole plan, so in the wide ring this is
    stricter than needed (only linear layers' inputs and outputs pass through Z_2^l)."""
    report = plan.report
    if "headroom_bits" not in report:
        return
    need = 62 - float(report["headroom_bits"]) + int(report.get("margin_bits", 0))
    if need > bits - 2:
        raise ModelError(
            f"two-party mode: node {report.get('headroom_node', '?')} needs {need:.1f} bits with margin, "
            f"the {bits}-bit ring holds {bits - 2}; lower --frac-bits"
        )


@dataclass
class TwoPartySession:
    """One party's session state: the channel to the peer, OT and HE set-ups, its own PRG."""

    ch: Channel
    is_data_owner: bool
    bits: int  # the shares' ring Z_2^bits: l (narrow mode) or 64 (wide mode)
    he_bits: int  # the HE plaintext ring of linear layers (= bits in narrow mode)
    ot: OTSession
    he: HESession | None  # None in a session whose offline material comes from a store
    prg: PRG
    rounds: int = 0  # online rounds (each protocol's stated count)
    offline_rounds: int = 0  # set-up and offline phases

    @property
    def ring(self) -> np.uint64:
        return U64((1 << self.bits) - 1)

    @property
    def wide(self) -> bool:
        return self.bits > self.he_bits

    def width(self, value_bits: int) -> int:
        """The ring a comparison on |x| < 2^value_bits runs in: the session's (narrow mode), or
        value_bits + 2 (wide mode: reduction is free, truncation needs |x| < 2^(ring-2))."""
        return self.bits if not self.wide else min(self.bits, value_bits + 2)

    def lift(self, tag: str, x: np.ndarray, bits: int) -> np.ndarray:
        """Shares over Z_2^bits back to the session's ring (``compare.extend``; no-op if equal)."""
        if bits == self.bits:
            return x
        self.rounds += 2
        return compare.extend(self.ot, tag, self.is_data_owner, x, bits, self.bits)


@dataclass
class LinearMaterial:
    """Offline result of one linear layer: the data owner's mask A and its share of L(W, A)
    (model owner: A is None, its share)."""

    mask: np.ndarray | None
    share: np.ndarray


@dataclass
class Offline:
    """One batch's offline material, keyed by request label; each entry used once."""

    items: dict[str, LinearMaterial | ReluMaterial | ProductMaterial] = field(default_factory=dict)

    def take(self, label: str, kind: type) -> Any:
        item = self.items.pop(label, None)
        if not isinstance(item, kind):
            raise ProtocolError(f"{label}: no offline {kind.__name__} prepared for this step")
        return item


class Recorder(Protocols):
    """Runs nothing: records (what, request) in consumption order and returns zeros."""

    is_data_owner = False

    def __init__(self, batch_index: int) -> None:
        super().__init__(batch_index)
        self.log: list[tuple[str, Request]] = []

    def _linear(self, req: Request, x: np.ndarray, weight: np.ndarray | None, weight_bits: int | None, bias: np.ndarray | None) -> np.ndarray:
        self.log.append(("linear", req))
        assert req.linear is not None  # set by Protocols.linear
        return np.zeros(req.linear.out_shape, U64)

    def _truncate(self, req: Request, x: np.ndarray) -> np.ndarray:
        self.log.append(("truncate", req))
        return np.zeros(x.shape, U64)

    def _relu(self, req: Request, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.log.append(("relu", req))
        return np.zeros(x.shape, U64), np.zeros(x.shape, U64)

    def _sign(self, req: Request, x: np.ndarray) -> np.ndarray:
        self.log.append(("sign", req))
        return np.zeros(x.shape, U64)

    def _multiply(self, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.log.append(("product", req))
        return np.zeros(x.shape, U64)

    def _square(self, req: Request, x: np.ndarray) -> np.ndarray:
        self.log.append(("product", req))
        return np.zeros(x.shape, U64)

    def _einsum(self, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        self.log.append(("product", req))
        assert req.product is not None
        return np.zeros(req.product.out_shape, U64)

    def reveal(self, x: np.ndarray) -> np.ndarray | None:
        return None


def _weight_bits(weights: PrivateWeights, node_id: str) -> int:
    """|W| < 2^bits for the HE flooding bound: the compiler's figure, else from the values."""
    if node_id in weights.weight_bits:
        return int(weights.weight_bits[node_id])
    w = weights.weight[node_id].view(np.int64)
    return max(1, int(np.abs(w).max(initial=0)).bit_length())


def prepare_offline(s: TwoPartySession, plan: Plan, steps: list[tuple[str, Request]], weights: PrivateWeights | None = None) -> Offline:
    """Input-independent material for one batch (before the image is used).

    1. ``steps``: the batch's secret ops in consumption order, from walking the plan with
       ``Recorder`` and the online executor (``privmed.runtime.twoparty.schedule``).
    2. Each linear layer: the data owner draws A uniform in Z_2^l of the input's exact shape
       (its own PRG, key of the request); both get shares of L(W, A): by ``he_linear`` for
       every layer but per-channel scales, all of them beside step 3 (``he_offline.overlapped``:
       the data owner's ciphertexts of every layer first, the model owner's products in a
       worker thread, the replies after step 3), and by vector COTs (``scale``) for scales.
    3. In the schedule's order, each per-channel scale's COTs, each ReLU's OT material
       (``offline.relu_offline``, with ``drop`` as the plan says), each product's triple.
    Rounds: 1 for all HE layers + 1 per per-channel scale + 3 per ReLU node + 2 per product.
    Bytes: ``he_linear``, ``scale``, ``relu_offline``, ``products``.
    Security: nothing here depends on the input; A is seen by the model owner only encrypted;
    the order is the public schedule's (``he_offline``: parallel composition).
    """
    if not s.is_data_owner and weights is None:
        raise ValueError("prepare_offline: the model owner must pass its weights")
    if s.he is None:
        raise ValueError("prepare_offline: the session has no HE set-up (open_session)")
    he = s.he
    out = Offline()
    he_steps = [(req, req.linear) for what, req in steps if what == "linear" and req.linear is not None and req.linear.kind != "channel_scale"]
    layers = [he_layer(he, f"off/{req.label}", spec.kind, spec.conv, spec.x_shape, spec.w_shape) for req, spec in he_steps]
    masks, private = None, None
    if s.is_data_owner:
        masks = [s.prg.stream(req.key).uint64(spec.x_shape) & ring_mask(s.he_bits) for req, spec in he_steps]
    elif weights is not None:
        ids = [plan.nodes[req.node_index].id for req, _ in he_steps]
        private = [ModelOwnerLayer(weights.weight[nid], _weight_bits(weights, nid), s.prg.stream(req.key))
                   for nid, (req, _) in zip(ids, he_steps, strict=True)]  # fmt: skip

    def ot_steps() -> None:
        for what, req in steps:
            tag = f"off/{req.label}"
            if what == "linear" and req.linear is not None and req.linear.kind == "channel_scale":  # HE: a ciphertext per channel
                spec = req.linear
                mask = s.prg.stream(req.key).uint64(spec.x_shape) & ring_mask(s.he_bits) if s.is_data_owner else None
                weight = weights.weight[plan.nodes[req.node_index].id] if weights is not None else None
                share = channel_scale_shares(s.ot, tag, s.is_data_owner, spec.x_shape, s.he_bits, mask=mask, weight=weight)
                out.items[req.label] = LinearMaterial(mask, share)
                s.offline_rounds += 1
            elif what == "relu" and req.nonlinear is not None:
                nl = req.nonlinear
                out.items[req.label] = relu_offline(s.ot, tag, s.is_data_owner, nl.n, s.width(nl.bits), s.prg.stream(req.key), nl.drop)
                s.offline_rounds += 3
            elif what == "product" and req.product is not None:
                ps = req.product
                if ps.equation:
                    out.items[req.label] = einsum_offline(s.ot, tag, s.is_data_owner, ps.equation, ps.x_shape, ps.y_shape, s.bits,
                                                          s.prg.stream(req.key))  # fmt: skip
                else:
                    y_shape = None if ps.square else ps.y_shape
                    out.items[req.label] = product_offline(s.ot, tag, s.is_data_owner, ps.x_shape, y_shape, s.bits,
                                                           s.prg.stream(req.key))  # fmt: skip
                s.offline_rounds += 2

    shares = overlapped(he, s.ch, layers, ot_steps, masks=masks, private=private)
    for k, ((req, _), share) in enumerate(zip(he_steps, shares, strict=True)):
        out.items[req.label] = LinearMaterial(masks[k] if masks is not None else None, share)
    s.offline_rounds += 1 if layers else 0
    return out


def _chunks(bits: int, drop: int) -> int:
    return -(-(bits - 1 - drop) // compare.CHUNK)


class TwoPartyOnline(Protocols):
    """The online protocols of one party (see the module docstring), on a batch's ``Offline``.

    The model owner's ``linear`` receives its weight and bias from ``SecureBackend``; the data
    owner passes neither. ``rounds`` counts communication rounds by each protocol's stated count.
    """

    def __init__(self, session: TwoPartySession, batch_index: int, offline: Offline) -> None:
        super().__init__(batch_index)
        self.s = session
        self.offline = offline

    @property
    def is_data_owner(self) -> bool:
        return self.s.is_data_owner

    def _linear(self, req: Request, x: np.ndarray, weight: np.ndarray | None, weight_bits: int | None, bias: np.ndarray | None) -> np.ndarray:
        s, spec = self.s, req.linear
        assert spec is not None  # set by Protocols.linear
        mat: LinearMaterial = self.offline.take(req.label, LinearMaterial)
        if mat.share.shape != spec.out_shape or (mat.mask is not None and mat.mask.shape != x.shape):
            raise ProtocolError(f"{req.label}: offline material for {mat.share.shape}, the layer needs {spec.out_shape}")
        xr = np.ascontiguousarray(x) & ring_mask(s.he_bits)
        y = online_linear(s.ch, req.label, s.is_data_owner, spec.kind, spec.conv, xr, mat.share, s.he_bits, mask=mat.mask, weight=weight)
        s.rounds += 1
        y = s.lift(f"{req.label}/ext", y.reshape(-1), s.he_bits).reshape(y.shape)
        if not s.is_data_owner and bias is not None:
            y = (y + bias) & s.ring
        return y

    def _truncate(self, req: Request, x: np.ndarray) -> np.ndarray:
        assert req.nonlinear is not None
        flat = np.ascontiguousarray(x).reshape(-1) & self.s.ring
        out = compare.truncate(self.s.ot, req.label, self.is_data_owner, flat, self.s.bits, req.nonlinear.shift)
        self.s.rounds += 2
        return out.reshape(x.shape)

    def _relu(self, req: Request, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ReLU(x) from the offline material (comparison on bits [drop, l-1)), then both ReLU(x)
        and x truncated by ``shift`` in one call: floor is monotone and floor(0) = 0, so
        ReLU(x) >> s = ReLU(x >> s); each result is floor or floor - 1 (independently)."""
        s, nl = self.s, req.nonlinear
        assert nl is not None
        mat: ReluMaterial = self.offline.take(req.label, ReluMaterial)
        ring = s.width(nl.bits)
        flat = np.ascontiguousarray(x).reshape(-1) & ring_mask(ring)
        if mat.n != flat.size or mat.bits != ring or mat.drop != nl.drop:
            raise ProtocolError(f"{req.label}: offline ReLU material for {mat.n} elements, the layer needs {flat.size}")
        r = relu_online(s.ch, req.label, s.is_data_owner, flat, mat)
        s.rounds += 4 + math.ceil(math.log2(max(1, _chunks(ring, nl.drop))))
        both = np.concatenate([r, flat])
        if nl.shift:
            both = compare.truncate(s.ot, f"{req.label}/t", s.is_data_owner, both, ring, nl.shift)
            s.rounds += 2
        both = s.lift(f"{req.label}/ext", both, ring)
        return both[: flat.size].reshape(x.shape), both[flat.size :].reshape(x.shape)

    def _sign(self, req: Request, x: np.ndarray) -> np.ndarray:
        s = self.s
        assert req.nonlinear is not None
        ring = s.width(req.nonlinear.bits) if s.wide else s.bits  # |x| < 2^bits: the sign lives mod 2^(bits+1)
        flat = np.ascontiguousarray(x).reshape(-1) & ring_mask(ring)
        bit = compare.drelu(s.ot, req.label, s.is_data_owner, flat, ring, s.prg.stream(req.key))
        out = compare.b2a(s.ot, req.label, s.is_data_owner, bit, s.bits)
        s.rounds += 5 + math.ceil(math.log2(max(1, _chunks(ring, 0))))
        return out.reshape(x.shape)

    def _multiply(self, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        mat: ProductMaterial = self.offline.take(req.label, ProductMaterial)
        self.s.rounds += 1
        return product_online(self.s.ot, req.label, self.is_data_owner, x & self.s.ring, y & self.s.ring, mat)

    def _square(self, req: Request, x: np.ndarray) -> np.ndarray:
        mat: ProductMaterial = self.offline.take(req.label, ProductMaterial)
        self.s.rounds += 1
        return product_online(self.s.ot, req.label, self.is_data_owner, x & self.s.ring, None, mat)

    def _einsum(self, req: Request, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        mat: ProductMaterial = self.offline.take(req.label, ProductMaterial)
        self.s.rounds += 1
        return product_online(self.s.ot, req.label, self.is_data_owner, x & self.s.ring, y & self.s.ring, mat)

    def reveal(self, x: np.ndarray) -> np.ndarray | None:
        """Open x to the data owner only: the model owner sends its share (1 message, |x|
        elements); the data owner checks each is in Z_2^l and sign-extends the sum to 64 bits."""
        s = self.s
        label = f"b{self.batch_index}:{self.node}/reveal"
        mine = np.ascontiguousarray(x) & s.ring
        if not s.is_data_owner:
            s.ch.send(label, mine)
            return None
        theirs = s.ch.recv(label, U64, mine.shape)
        if np.any(theirs > s.ring):
            raise ProtocolError(f"{label}: expected elements of Z_2^{s.bits} from the model owner")
        s.rounds += 1
        return sign_extend((mine + theirs) & s.ring, s.bits)


OT_ENGINES = ("iknp", "ferret")
# Ferret since 2026-11-30: DenseNet-121 64x64 in one sitting sent 1.56 GB instead of 2.81 GB,
# with the same outputs and no more time (docs/twoparty.md, "Silent OT"); "iknp" stays selectable
DEFAULT_OT_ENGINE = "ferret"
OT_ENGINE_ENV = "PRIVMED_2P_OT_ENGINE"  # read at session set-up when no engine is passed


def agree_ot_engine(ch: Channel, engine: str) -> None:
    """Both parties state their OT engine (one round, a few bytes each) and stop, naming both,
    if they differ: the engines' messages differ, so a mismatch would otherwise fail later on
    an unexpected message."""
    if engine not in OT_ENGINES:
        raise ValueError(f"two-party OT engine: expected one of {', '.join(OT_ENGINES)}, got {engine!r}")
    ch.send_text("ot-engine", engine)
    theirs = ch.recv_text("ot-engine", 16)
    if theirs != engine:
        raise ProtocolError(f"two-party OT engine: this party runs {engine}, {ch.peer} runs {theirs[:16]!r}")


def open_session(ch: Channel, is_data_owner: bool, bits: int, he_bits: int | None = None, ot_engine: str | None = None) -> TwoPartySession:
    """Once per session: the data owner's BFV public key (``he_setup``, t = 2^l), the OT engine
    agreed (``agree_ot_engine``), base OTs both ways (``ot_setup``) and, for ``"ferret"``,
    Ferret's bootstrap (``silent_ot.attach_ferret``, ``FERRET_MEDIUM``: 1.2 MB each way); each
    party draws its own PRG seed from the OS. ``ot_engine`` None takes the environment's
    ``PRIVMED_2P_OT_ENGINE`` (how a benchmark switches both processes), else ``DEFAULT_OT_ENGINE``."""
    engine = ot_engine or os.environ.get(OT_ENGINE_ENV) or DEFAULT_OT_ENGINE
    prg = PRG.fresh()
    he_bits = bits if he_bits is None else he_bits
    he = he_setup(SealIO(HEParams(plain_bits=he_bits)), ch, is_data_owner)
    agree_ot_engine(ch, engine)
    ot = ot_setup(ch, "privmed-2p", prg, is_data_owner)
    rounds = 4  # key 1, engine 1, base OTs 2
    if engine == "ferret":
        attach_ferret(ot, prg, is_data_owner, FERRET_MEDIUM)
        rounds += 1
    return TwoPartySession(ch, is_data_owner, bits, he_bits, ot, he, prg, offline_rounds=rounds)
