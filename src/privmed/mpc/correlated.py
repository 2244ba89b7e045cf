"""Correlated randomness: what each protocol consumes, and the dealer that makes it.

The dealer is a third party that only produces input-independent randomness (it never sees a
share of the image, the weights or the output). At session start it sends a fresh 16-byte seed
to each party over mutual TLS (seed agreement). Everything a party can expand from its own seed
it expands locally; the dealer computes the remaining *correction* terms, which only the model
owner (party 1) receives. So the data owner gets nothing but a seed, and the dealer's traffic is
one message per layer to the model owner.

``CorrelationSource`` is the interface the protocols see. ``DealerSource`` implements it from a
seed plus the dealer's corrections; a dealer-free source (OT extension / HE, as in CrypTFlow2)
would implement the same two methods. The order in which material is consumed is fixed by
``requests(plan, batch)``, which the dealer iterates and the runtime follows.

Every request carries a ``StreamKey`` (batch, node index, purpose, step): its material is
expanded from that key only. The keys of all requests of a session are distinct (one node
index per node; per node, distinct (purpose, step) pairs; per batch, its own batch number;
session-wide material under ``SESSION``), and ``privmed.crypto.prg`` maps distinct keys to
disjoint AES counter ranges, so no two requests ever share a mask, whatever the plan's node
ids are (``tests/protocol/test_hostile_vendor.py`` checks the distinctness over many plans).

Material per request (n elements, m = (bits - drop) / 4 comparison chunks):

- linear layer L(W, x): party 0 gets A (input mask) and C0; party 1 gets B (weight mask, seed)
  and C1 = L(B, A) - C0 (correction, |out| ring elements).
- truncation by s: r (both seeded, r = r0 + r1), shares of R = r >> s and M = msb(r);
  correction to party 1: 2n ring elements.
- ReLU (with optional truncation): additionally a random bit c_hat shared arithmetically, shares
  of c_hat*R and c_hat*M, XOR-shared truth tables for [v < r_j] and [v == r_j] of every 4-bit
  chunk r_j of r's bits [drop, bits), the bit r_bits XOR c_hat, and AND triples for the
  comparison tree. Correction to party 1: 5n ring elements (3n when s = 0) + 4m n bytes of
  tables + about (2m + 1) n / 8 bytes of bits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np

from privmed.crypto.prg import PRG, SESSION, Stream, StreamKey
from privmed.errors import ProtocolError
from privmed.ir.ops import conv_spec
from privmed.ir.plan import Node, Plan
from privmed.net.channel import Channel
from privmed.ring.linalg import linear

U64 = np.uint64
CHUNK = 4


class Purpose(IntEnum):
    """``StreamKey.purpose``: what a stream's material is for."""

    LINEAR = 1  # data owner's input mask A and product share C0
    WEIGHT_MASK = 2  # model owner's weight mask B (fixed for the session)
    NONLINEAR = 3  # truncation / comparison material and its AND triples
    PRODUCT = 4  # Beaver triple of a secret product or square
    DEALER_BITS = 5  # the dealer's private random bits (c_hat)


def require_shape(label: str, what: str, arr: np.ndarray, shape: tuple[int, ...]) -> None:
    """Abort unless ``arr`` has exactly ``shape``: a mask, table or triple is never broadcast
    over the value it protects (a broadcast mask would reuse one random value many times)."""
    if tuple(arr.shape) != tuple(shape):
        raise ProtocolError(f"protocol error at {label}: {what} has shape {tuple(arr.shape)}, the value it protects {tuple(shape)}; session aborted")


@dataclass(frozen=True)
class NonlinearSpec:
    n: int
    shift: int
    bits: int = 0  # comparison width l (|x| < 2^l)
    drop: int = 0  # low bits ignored by the comparison
    relu: bool = False

    @property
    def chunks(self) -> int:
        return (self.bits - self.drop) // CHUNK if self.relu else 0


def merge_schedule(m: int) -> list[list[tuple[int, int, bool]]]:
    """Levels of the comparison tree: (lo, hi, need_eq) pairs over the current list.

    Element 0 of each level is only ever a low half, so its 'equal' bit is never needed.
    """
    levels, count = [], m
    while count > 1:
        levels.append([(2 * p, 2 * p + 1, p > 0) for p in range(count // 2)])
        count = count // 2 + count % 2
    return levels


def ands_per_level(m: int) -> list[int]:
    return [sum(1 + int(eq) for _, _, eq in lvl) for lvl in merge_schedule(m)]


@dataclass
class LinearShares:
    mask: np.ndarray  # party 0: A (input mask); party 1: B (weight mask)
    product: np.ndarray  # party 0: C0; party 1: C1 with C0 + C1 = L(B, A)


@dataclass
class NonlinearShares:
    r: np.ndarray
    R: np.ndarray
    M: np.ndarray | None = None
    chat: np.ndarray | None = None
    chatR: np.ndarray | None = None
    chatM: np.ndarray | None = None
    lt: np.ndarray | None = None  # (m, n) uint16 truth tables, XOR-shared
    eq: np.ndarray | None = None
    q: np.ndarray | None = None  # (n,) uint8
    triples: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


# -- seed expansion (identical in the party and the dealer) ------------------------------
def expand_linear(prg: PRG, req: Request, index: int) -> LinearShares:
    """Party 0: A and C0 (fresh per batch); party 1: B, fixed for the whole session so that the
    masked weights W - B are sent once per session and reused for every batch."""
    if index == 0:
        s = prg.stream(req.key)
        return LinearShares(s.uint64(req.x_shape), s.uint64(req.out_shape))
    w_shape = tuple(req.node.attrs["w_shape"])
    return LinearShares(prg.stream(weight_mask_key(req)).uint64(w_shape), np.zeros(0, dtype=U64))


def weight_mask_key(req: Request) -> StreamKey:
    """The session-wide key of the weight mask B of the request's node (one weight per node)."""
    return StreamKey(SESSION, req.node_index, Purpose.WEIGHT_MASK)


def packed_len(n: int) -> int:
    """Bytes of n bits packed 8 per byte (numpy packbits order)."""
    return (n + 7) // 8


def expand_nonlinear(stream: Stream, index: int, spec: NonlinearSpec) -> NonlinearShares:
    """Seeded material; bits (q, triples) are kept packed, 8 elements per byte."""
    n, nb = spec.n, packed_len(spec.n)
    sh = NonlinearShares(r=stream.uint64(n), R=np.zeros(0, U64))
    m = spec.chunks
    if index == 0:
        sh.R = stream.uint64(n)
        sh.M = stream.uint64(n) if spec.shift else None
        if spec.relu:
            sh.chat, sh.chatR = stream.uint64(n), stream.uint64(n)
            sh.chatM = stream.uint64(n) if spec.shift else None
            sh.lt, sh.eq = stream.uint16((m, n)), stream.uint16((m, n))
            sh.q = stream.uint8(nb)
    for k in ands_per_level(m):
        a, b = stream.uint8((k, nb)), stream.uint8((k, nb))
        z = stream.uint8((k, nb)) if index == 0 else np.zeros((k, nb), np.uint8)
        sh.triples.append((a, b, z))
    return sh


def _arith_fields(spec: NonlinearSpec) -> list[str]:
    names = ["R"] + (["M"] if spec.shift else [])
    if spec.relu:
        names += ["chat", "chatR"] + (["chatM"] if spec.shift else [])
    return names


# -- the dealer's corrections ------------------------------------------------------------
def linear_correction(req: Request, prg0: PRG, prg1: PRG) -> np.ndarray:
    p0, p1 = expand_linear(prg0, req, 0), expand_linear(prg1, req, 1)
    spec = conv_spec(req.node.attrs) if "spec" in req.node.attrs else None
    return linear(req.node.attrs["kind"], spec, p1.mask, p0.mask) - p0.product


def nonlinear_correction(spec: NonlinearSpec, s0: Stream, s1: Stream, private: Stream) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(arithmetic corrections (k, n) u64, tables (2, m, n) u16 or None, packed bits u8)."""
    p0, p1 = expand_nonlinear(s0, 0, spec), expand_nonlinear(s1, 1, spec)
    r = p0.r + p1.r
    full = {"R": r >> U64(spec.shift), "M": r >> U64(63)}
    bits: list[np.ndarray] = []
    tables = None
    if spec.relu:
        chat_bits = private.bits(spec.n)
        chat = chat_bits.astype(U64)
        full.update(chat=chat, chatR=chat * full["R"], chatM=chat * full["M"])
        rj = nibbles(r, spec.drop, spec.chunks)
        one = np.uint16(1)
        tables = np.empty((2, spec.chunks, spec.n), dtype=np.uint16)
        np.subtract(one << rj, one, out=tables[0])
        np.left_shift(one, rj, out=tables[1])
        tables[0] ^= p0.lt
        tables[1] ^= p0.eq
        r_top = ((r >> U64(spec.bits)) & U64(1)).astype(np.uint8)
        bits.append(np.packbits(r_top ^ chat_bits) ^ p0.q)  # type: ignore[operator]
    arith = np.empty((len(_arith_fields(spec)), spec.n), dtype=U64)
    for i, name in enumerate(_arith_fields(spec)):
        np.subtract(full[name], getattr(p0, name), out=arith[i])
    for (a0, b0, z0), (a1, b1, _) in zip(p0.triples, p1.triples, strict=True):
        bits.append((((a0 ^ a1) & (b0 ^ b1)) ^ z0).reshape(-1))
    packed = np.concatenate(bits) if bits else np.zeros(0, np.uint8)
    return arith, tables, packed


def nibbles(v: np.ndarray, drop: int, m: int) -> np.ndarray:
    """The m 4-bit chunks of v's bits [drop, drop + 4m) as uint16 (m, n).

    With drop a multiple of 4 the chunks are read from the little-endian bytes of v, which
    touches 8x less memory than 64-bit shifts.
    """
    out = np.empty((m, v.shape[0]), dtype=np.uint16)
    if drop % CHUNK == 0:
        by = v.view(np.uint8).reshape(-1, 8)
        for j in range(m):
            off = drop + CHUNK * j
            col = by[:, off // 8]
            np.bitwise_and(col >> np.uint8(off % 8) if off % 8 else col, np.uint8(15), out=out[j], casting="unsafe")
        return out
    for j in range(m):
        out[j] = (v >> U64(drop + CHUNK * j)) & U64(15)
    return out


# -- the order of consumption --------------------------------------------------------------
@dataclass(frozen=True)
class ProductSpec:
    """A Beaver product of two secret tensors: x (x_shape) times y (y_shape, broadcast to
    x_shape), or the square of x."""

    x_shape: tuple[int, ...]
    y_shape: tuple[int, ...] = ()
    square: bool = False


@dataclass(frozen=True)
class Request:
    """One correlation: ``label`` names its messages (frame tags, logs); ``key`` keys its
    randomness; ``node_index`` is the node's position in the plan."""

    label: str
    node: Node
    nonlinear: NonlinearSpec | None = None
    x_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()
    product: ProductSpec | None = None
    key: StreamKey = StreamKey(0, 0, Purpose.NONLINEAR)
    node_index: int = 0


@dataclass
class ProductShares:
    a: np.ndarray
    b: np.ndarray | None
    c: np.ndarray  # party 0: seeded; party 1: the dealer's correction


def expand_product(prg: PRG, req: Request, index: int) -> ProductShares:
    spec = req.product
    assert spec is not None
    s = prg.stream(req.key)
    a = s.uint64(spec.x_shape)
    b = None if spec.square else s.uint64(spec.y_shape)
    c = s.uint64(spec.x_shape) if index == 0 else np.zeros(0, U64)
    return ProductShares(a, b, c)


def product_correction(req: Request, prg0: PRG, prg1: PRG) -> np.ndarray:
    """c1 = a * b - c0 (a * a for a square), b broadcast over a's shape."""
    p0, p1 = expand_product(prg0, req, 0), expand_product(prg1, req, 1)
    a = p0.a + p1.a
    b = a if p0.b is None or p1.b is None else p0.b + p1.b
    return a * b - p0.c


def instnorm_schedule(node: Node, batch: int) -> list[tuple[str, str, dict]]:
    """The correlation requests of one secure instance normalisation, in the order
    ``privmed.mpc.norm.instance_norm`` consumes them: (suffix, kind, params)."""
    a = node.attrs
    c, m = node.shape[0], int(np.prod(node.shape[1:]))
    groups, x3, g3 = batch * c, (batch, c, m), (batch, c, 1)
    f = a["frac_bits"]
    steps: list[tuple[str, str, dict]] = [("mu", "trunc", {"n": groups, "shift": f}), ("sq", "square", {"x": x3})]
    if a["sum_first"]:
        steps.append(("s2t", "trunc", {"n": groups, "shift": f}))
    else:
        steps.append(("sqt", "trunc", {"n": batch * c * m, "shift": f}))
    steps += [("var", "trunc", {"n": groups, "shift": f}), ("sign", "sign", {"n": groups * (a["k_hi"] - a["k_lo"] + 1)})]
    for t in range(a["iters"]):
        steps += [
            (f"i{t}y2", "square", {"x": g3}), (f"i{t}y2t", "trunc", {"n": groups, "shift": f}),
            (f"i{t}vy", "mul", {"x": g3, "y": g3}), (f"i{t}vyt", "trunc", {"n": groups, "shift": f + 1}),
            (f"i{t}yt", "mul", {"x": g3, "y": g3}), (f"i{t}ytt", "trunc", {"n": groups, "shift": f}),
        ]
    if a["affine"]:
        steps += [("gamma", "linear", {"x": g3}), ("gammat", "trunc", {"n": groups, "shift": f})]
    steps.append(("out", "mul", {"x": x3, "y": g3}))
    return steps


def _instnorm_requests(node: Node, batch: int, pre: str, index: int, k: int) -> Iterator[Request]:
    for step, (suffix, kind, prm) in enumerate(instnorm_schedule(node, batch)):
        label = f"{pre}{k}/{suffix}"
        if kind == "trunc":
            yield Request(label, node, NonlinearSpec(prm["n"], prm["shift"]), key=StreamKey(index, k, Purpose.NONLINEAR, step), node_index=k)
        elif kind == "sign":
            spec = NonlinearSpec(prm["n"], 0, node.attrs["sign_bits"], 0, True)
            yield Request(label, node, spec, key=StreamKey(index, k, Purpose.NONLINEAR, step), node_index=k)
        elif kind == "square":
            yield Request(label, node, product=ProductSpec(prm["x"], square=True), key=StreamKey(index, k, Purpose.PRODUCT, step), node_index=k)
        elif kind == "mul":
            yield Request(label, node, product=ProductSpec(prm["x"], prm["y"]), key=StreamKey(index, k, Purpose.PRODUCT, step), node_index=k)
        else:  # the model owner's private gamma times the shared 1/sqrt(var + eps)
            yield Request(label, node, None, prm["x"], prm["x"], key=StreamKey(index, k, Purpose.LINEAR, step), node_index=k)


def maxpool_levels(node: Node, batch: int) -> list[int]:
    """Element counts of each pairwise-max level for a max-pool node."""
    outer = batch * int(np.prod(node.shape))
    k, sizes = int(np.prod(node.attrs["kernel"])), []
    while k > 1:
        sizes.append(outer * (k // 2))
        k = k // 2 + k % 2
    return sizes


def requests(plan: Plan, batch: int, index: int = 0) -> Iterator[Request]:
    """Every correlation of batch number ``index`` of a session, in consumption order.

    Labels (message tags) are ``b{index}:{node index}`` plus a suffix per sub-step; keys are
    ``StreamKey(index, node index, purpose, step)`` (see the module docstring).
    """
    shapes = {n.id: n.shape for n in plan.nodes}
    pre = f"b{index}:"
    for k, node in enumerate(plan.nodes):
        n = batch * int(np.prod(node.shape))
        a = node.attrs
        label = f"{pre}{k}"
        if node.op == "linear":
            key = StreamKey(index, k, Purpose.LINEAR)
            yield Request(label, node, None, (batch, *shapes[node.inputs[0]]), (batch, *node.shape), key=key, node_index=k)
        elif node.op in ("relu", "leaky_relu"):
            spec = NonlinearSpec(n, a["shift"], a["bits"], a["drop"], True)
            yield Request(label, node, spec, key=StreamKey(index, k, Purpose.NONLINEAR), node_index=k)
        elif node.op == "trunc":
            yield Request(label, node, NonlinearSpec(n, a["shift"]), key=StreamKey(index, k, Purpose.NONLINEAR), node_index=k)
        elif node.op == "maxpool":
            for lvl, size in enumerate(maxpool_levels(node, batch)):
                spec = NonlinearSpec(size, 0, a["bits"], 0, True)
                yield Request(f"{label}/{lvl}", node, spec, key=StreamKey(index, k, Purpose.NONLINEAR, lvl), node_index=k)
        elif node.op == "instnorm":
            yield from _instnorm_requests(node, batch, pre, index, k)


# -- the interface the protocols use --------------------------------------------------------
class CorrelationSource(ABC):
    """Where a party's correlated randomness comes from (dealer now, dealer-free later)."""

    @abstractmethod
    def linear(self, req: Request) -> LinearShares: ...

    @abstractmethod
    def nonlinear(self, req: Request) -> NonlinearShares: ...

    @abstractmethod
    def product(self, req: Request) -> ProductShares: ...


class DealerSource(CorrelationSource):
    """Party side of the dealer: expand from the seed, receive corrections (party 1 only)."""

    def __init__(self, index: int, seed: bytes, dealer: Channel | None) -> None:
        self.index = index
        self.prg = PRG(seed)
        self.dealer = dealer

    def linear(self, req: Request) -> LinearShares:
        sh = expand_linear(self.prg, req, self.index)
        if self.index == 1:
            assert self.dealer is not None
            sh.product = self.dealer.recv(f"{req.label}/C", U64, req.out_shape)
        return sh

    def product(self, req: Request) -> ProductShares:
        sh = expand_product(self.prg, req, self.index)
        if self.index == 1:
            assert self.dealer is not None and req.product is not None
            sh.c = self.dealer.recv(f"{req.label}/P", U64, req.product.x_shape)
        return sh

    def nonlinear(self, req: Request) -> NonlinearShares:
        spec = req.nonlinear
        assert spec is not None
        sh = expand_nonlinear(self.prg.stream(req.key), self.index, spec)
        if self.index == 0:
            return sh
        assert self.dealer is not None
        names = _arith_fields(spec)
        arith = self.dealer.recv(f"{req.label}/A", U64, (len(names), spec.n))
        for i, name in enumerate(names):
            setattr(sh, name, arith[i])
        levels = ands_per_level(spec.chunks)
        nb = packed_len(spec.n)
        total = (nb if spec.relu else 0) + sum(levels) * nb
        flat = self.dealer.recv(f"{req.label}/B", np.uint8, (total,))
        pos = 0
        if spec.relu:
            tables = self.dealer.recv(f"{req.label}/T", np.uint16, (2, spec.chunks, spec.n))
            sh.lt, sh.eq = tables[0], tables[1]
            sh.q, pos = flat[:nb], nb
        for lvl, k in enumerate(levels):
            a, b, _ = sh.triples[lvl]
            sh.triples[lvl] = (a, b, flat[pos : pos + k * nb].reshape(k, nb))
            pos += k * nb
        return sh


def run_dealer(plan: Plan, batch: int, index: int, prgs: tuple[PRG, PRG, PRG], to_model_owner: Channel, on_request=None) -> None:  # type: ignore[no-untyped-def]
    """Produce and send every correction of batch ``index``, in consumption order.

    ``prgs`` = (seed PRG shared with party 0, with party 1, the dealer's private PRG).
    """
    prg0, prg1, private = prgs
    for req in requests(plan, batch, index):
        if on_request:
            on_request(req)
        to_model_owner.step = f"dealer {req.node.id} ({req.label})"
        if req.product is not None:
            to_model_owner.send(f"{req.label}/P", product_correction(req, prg0, prg1))
            continue
        if req.nonlinear is None:
            to_model_owner.send(f"{req.label}/C", linear_correction(req, prg0, prg1))
            continue
        s0, s1 = prg0.stream(req.key), prg1.stream(req.key)
        bits_key = StreamKey(req.key.batch, req.key.node, Purpose.DEALER_BITS, req.key.step)
        arith, tables, packed = nonlinear_correction(req.nonlinear, s0, s1, private.stream(bits_key))
        to_model_owner.send(f"{req.label}/A", arith)
        to_model_owner.send(f"{req.label}/B", packed)
        if tables is not None:
            to_model_owner.send(f"{req.label}/T", tables)
