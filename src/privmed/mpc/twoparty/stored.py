"""One party's offline material for one batch (``protocols.Offline``) and its IKNP state as
named numpy arrays, and back, every array checked against what the plan implies (issue 14,
``--precompute``: correlations made before any image exists, kept on disk, used once).

Arrays are named by the position ``j`` of their step in the batch's schedule
(``privmed.runtime.twoparty.schedule``), not by label: a set made as batch k of the precompute
session is consumed as batch i of a later one, whose labels carry i. ``offline_from_arrays``
rebuilds the material from the consuming batch's own schedule: the names must be exactly the
expected ones and every array must have the dtype, the shape and the value range the schedule
implies (shares and masks in Z_2^ring, bits 0/1, 2-bit pads, 4-bit choices). What it cannot
check (that the values are the ones the peer's material pairs with) is the binding's job: the
store id both parties agreed on, the plan's fingerprint and the peer's certificate
(``privmed.runtime.twoparty_store``).

Security: nothing here sends anything. Reading material back is safe only if it is used once
(a mask or pad used for two inputs reveals their difference); the store deletes a set before
its online phase starts and records its index as used, and ``ReluMaterial.spent`` and
``Offline.take`` keep the in-memory copy single-use. The IKNP state of the precompute session
(delta, base-OT seeds) is stored with each set, the seeds derived per set
(``offline_arrays``), and continued under a label unique to the store and set (``ot_label``):
the PRG expansions and hash keys of IKNP are functions of that label and of the derived
seeds, so no OT of one set coincides with another's or with the precompute session's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from privmed.crypto.prg import PRG
from privmed.errors import InputError
from privmed.mpc.correlation.requests import Request
from privmed.mpc.twoparty.compare import CHUNK, tree_ands
from privmed.mpc.twoparty.offline import ReluMaterial
from privmed.mpc.twoparty.ot import KAPPA, OTSession, TCCRHash
from privmed.mpc.twoparty.products import ProductMaterial
from privmed.mpc.twoparty.protocols import LinearMaterial, Offline
from privmed.net.channel import Channel

U64, U8 = np.dtype(np.uint64), np.dtype(np.uint8)
Spec = tuple[np.dtype, tuple[int, ...], int]  # dtype, shape, largest allowed value


class StoreError(InputError):
    """A stored set is unreadable, does not match what the plan implies, or was used already."""


def ot_label(store_id: str, index: int) -> str:
    """The IKNP label of stored set ``index``: unique per store and set (see module docstring)."""
    return f"privmed-2p/{store_id}/{index}"


def _relu_specs(j: int, n: int, bits: int, drop: int, is_data_owner: bool) -> dict[str, Spec]:
    m = -(-(bits - 1 - drop) // CHUNK)
    top = (1 << bits) - 1
    t = n * tree_ands(m)
    specs: dict[str, Spec] = {f"{j}.t{i}": (U8, (t,), 1) for i in range(3)}
    specs |= {f"{j}.h0": (U64, (n,), top), f"{j}.h1": (U64, (n,), top), f"{j}.rc": (U8, (n,), 1), f"{j}.rk": (U64, (n,), top)}
    if is_data_owner:
        specs |= {f"{j}.pads": (U8, (n * m, 16), 3), f"{j}.choices": (U8, (0,), 0), f"{j}.lt": (U8, (m, n), 1), f"{j}.eq": (U8, (m, n), 1)}
    else:
        specs |= {f"{j}.pads": (U8, (n * m,), 3), f"{j}.choices": (U8, (n * m,), 15), f"{j}.lt": (U8, (0, 0), 0), f"{j}.eq": (U8, (0, 0), 0)}
    return specs


@dataclass(frozen=True)
class Rings:
    """What the material's layout depends on besides the schedule: the role and the rings."""

    is_data_owner: bool
    bits: int  # the shares' ring (``TwoPartySession.bits``)
    he_bits: int  # linear layers' ring

    def width(self, value_bits: int) -> int:
        """A comparison's ring, as ``TwoPartySession.width``."""
        return self.bits if self.bits == self.he_bits else min(self.bits, value_bits + 2)


def expected_arrays(s: Rings, steps: list[tuple[str, Request]]) -> dict[str, Spec]:
    """Every array one party's material for ``steps`` consists of: name -> (dtype, shape, max),
    from the schedule and the session's rings alone (plus the IKNP state)."""
    specs: dict[str, Spec] = {
        "ot.delta": (U8, (KAPPA,), 1),
        "ot.sender": (U8, (KAPPA, 16), 255),
        "ot.receiver": (U8, (KAPPA, 2, 16), 255),
    }
    he_top, top = (1 << s.he_bits) - 1, (1 << s.bits) - 1
    for j, (what, req) in enumerate(steps):
        if what == "linear" and req.linear is not None:
            specs[f"{j}.share"] = (U64, tuple(req.linear.out_shape), he_top)
            if s.is_data_owner:
                specs[f"{j}.mask"] = (U64, tuple(req.linear.x_shape), he_top)
        elif what == "relu" and req.nonlinear is not None:
            nl = req.nonlinear
            specs |= _relu_specs(j, nl.n, s.width(nl.bits), nl.drop, s.is_data_owner)
        elif what == "product" and req.product is not None:
            ps = req.product
            specs[f"{j}.a"] = (U64, tuple(ps.x_shape), top)
            if not ps.square:
                specs[f"{j}.b"] = (U64, tuple(ps.y_shape), top)
            specs[f"{j}.c"] = (U64, tuple(ps.out_shape), top)
    return specs


def _derive(seed: bytes, label: str) -> bytes:
    """A base-OT seed for one stored set: PRF(seed, label) (AES-CTR keyed by the seed)."""
    return bytes(PRG(seed).stream(f"{label}/base-seed").bytes(16))


def offline_arrays(offline: Offline, ot: OTSession, steps: list[tuple[str, Request]], label: str) -> dict[str, np.ndarray]:
    """``offline`` (made for ``steps``, not yet used) and the IKNP state for ``label`` as named
    arrays. The base-OT seeds are stored derived (``_derive``): each side derives its own the
    same way, so the IKNP correlation holds (a party that knew one seed of a pair knows its
    derived value only), and one set's file reveals nothing of another set's OTs or of the
    precompute session's (PRF outputs under keys it does not hold); delta is the session's."""
    out: dict[str, np.ndarray] = {
        "ot.delta": np.asarray(ot.delta, np.uint8),
        "ot.sender": np.frombuffer(b"".join(_derive(k, label) for k in ot.sender_seeds), np.uint8).reshape(KAPPA, 16),
        "ot.receiver": np.frombuffer(b"".join(_derive(k0, label) + _derive(k1, label) for k0, k1 in ot.receiver_seeds),
                                     np.uint8).reshape(KAPPA, 2, 16),  # fmt: skip
    }
    for j, (_, req) in enumerate(steps):
        item = offline.items.get(req.label)
        if isinstance(item, LinearMaterial):
            out[f"{j}.share"] = item.share
            if item.mask is not None:
                out[f"{j}.mask"] = item.mask
        elif isinstance(item, ReluMaterial):
            if item.spent:
                raise StoreError(f"{req.label}: ReLU material already used; it cannot be stored")
            out |= {f"{j}.t{i}": t for i, t in enumerate(item.triples)}
            out |= {f"{j}.pads": item.pads, f"{j}.choices": item.choices, f"{j}.h0": item.send_keys[0], f"{j}.h1": item.send_keys[1],
                    f"{j}.rc": item.recv_choice, f"{j}.rk": item.recv_key, f"{j}.lt": item.tables_mask[0], f"{j}.eq": item.tables_mask[1]}  # fmt: skip
        elif isinstance(item, ProductMaterial):
            out[f"{j}.a"], out[f"{j}.c"] = item.a, item.c
            if item.b is not None:
                out[f"{j}.b"] = item.b
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def check_arrays(where: str, arrays: dict[str, np.ndarray], specs: dict[str, Spec]) -> None:
    """Refuse, naming ``where`` and the array, anything but exactly ``specs``."""
    missing, extra = sorted(set(specs) - set(arrays)), sorted(set(arrays) - set(specs))
    if missing or extra:
        what = f"missing {', '.join(missing[:4])}" if missing else f"unexpected {', '.join(extra[:4])}"
        raise StoreError(f"{where}: not the material this plan implies ({what})")
    for name, (dtype, shape, top) in specs.items():
        arr = arrays[name]
        if arr.dtype != dtype or tuple(arr.shape) != shape:
            raise StoreError(f"{where}: array {name} is {arr.dtype} {tuple(arr.shape)}, the plan implies {dtype} {shape}")
        if arr.size and int(arr.max()) > top:
            raise StoreError(f"{where}: array {name} has values above {top}, outside its ring")


def ot_from_arrays(ch: Channel, label: str, is_data_owner: bool, arrays: dict[str, np.ndarray]) -> OTSession:
    """The stored IKNP state, continued on ``ch`` under ``label`` (counters from 0)."""
    sender = [bytes(row) for row in arrays["ot.sender"]]
    receiver = [(bytes(pair[0]), bytes(pair[1])) for pair in arrays["ot.receiver"]]
    me, peer = ("d", "m") if is_data_owner else ("m", "d")
    return OTSession(ch, label, arrays["ot.delta"].copy(), sender, receiver, TCCRHash(f"{label}/{me}"), TCCRHash(f"{label}/{peer}"))


def offline_from_arrays(where: str, s: Rings, steps: list[tuple[str, Request]], arrays: dict[str, np.ndarray]) -> Offline:
    """Checked material for ``steps`` (this session's labels) from ``arrays``; ``s`` gives the
    rings and the role. Raises ``StoreError`` naming ``where`` on any mismatch."""
    check_arrays(where, arrays, expected_arrays(s, steps))
    out = Offline()
    for j, (what, req) in enumerate(steps):
        if what == "linear" and req.linear is not None:
            out.items[req.label] = LinearMaterial(arrays.get(f"{j}.mask"), arrays[f"{j}.share"])
        elif what == "relu" and req.nonlinear is not None:
            nl, a = req.nonlinear, {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{j}.")}
            out.items[req.label] = ReluMaterial(nl.n, s.width(nl.bits), nl.drop, a["pads"], a["choices"], (a["t0"], a["t1"], a["t2"]),
                                                (a["h0"], a["h1"]), a["rc"], a["rk"], (a["lt"], a["eq"]))  # fmt: skip
        elif what == "product" and req.product is not None:
            ps = req.product
            out.items[req.label] = ProductMaterial(arrays[f"{j}.a"], arrays.get(f"{j}.b"), arrays[f"{j}.c"], s.bits, ps.equation)
    return out
