"""Two-party (dealer-free) primitives, measured: HE conv layer, 1-of-16 OT, ReLU; and the
dealer mode's ReLU and conv figures in the same run, for comparison.

Both parties run as threads over the in-process transport on this machine, so wall time
includes both parties' compute on the shared cores (no network latency); bytes are the framed
bytes each party sent (136-byte headers included). Per-party CPU seconds are thread CPU time.

    .venv/bin/python benchmarks/twoparty_primitives.py            # everything (~1-2 min)
    .venv/bin/python benchmarks/twoparty_primitives.py --quick    # smaller sizes
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from privmed.crypto.prg import PRG
from privmed.mpc.twoparty import arith, offline
from privmed.mpc.twoparty import compare as cmp
from privmed.mpc.twoparty.ot import ot16_recv, ot16_send, ot_setup
from privmed.net.channel import Channel, in_process_pair
from privmed.ring.linalg import ConvSpec, linear

U64 = np.uint64


def two(f0: Callable[[Channel], Any], f1: Callable[[Channel], Any]) -> dict[str, Any]:
    """Run both parties on fresh in-process channels; results, wall, CPU and bytes sent per party
    (``twoparty_silent_ot.two``)."""
    from twoparty_silent_ot import two as two_on

    return two_on(f0, f1, in_process_pair("data-owner", "model-owner", os.urandom(16), 600))


def measure_he_layer(kind: str, spec: ConvSpec, x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> dict[str, Any]:
    """One HE linear layer between two threads on a random mask and 12-bit weights: wall, CPU
    and bytes of each party (``two``), whether the shares equal the ring result, the output
    count and the plaintext bits."""
    from privmed.mpc.twoparty.he_linear import he_linear, he_setup
    from privmed.mpc.twoparty.seal_io import HEParams, SealIO

    rng = np.random.default_rng(0)
    params = HEParams()
    mask = U64((1 << params.plain_bits) - 1)
    x0 = rng.integers(0, 1 << params.plain_bits, x_shape, dtype=U64)
    w = rng.integers(-(2**11), 2**11, w_shape, dtype=np.int64)
    ios = [SealIO(params), SealIO(params)]
    hes: dict[int, Any] = {}
    try:
        two(lambda ch: hes.__setitem__(0, he_setup(ios[0], ch, True)), lambda ch: hes.__setitem__(1, he_setup(ios[1], ch, False)))
        r = two(
            lambda ch: he_linear(hes[0], ch, "c", kind, spec, x_shape, w_shape, x=x0),
            lambda ch: he_linear(hes[1], ch, "c", kind, spec, x_shape, w_shape, weight=w, weight_bits=12, stream=PRG.fresh().stream("m")),
        )
    finally:
        for io in ios:
            io.close()
    r["exact"] = bool(np.array_equal((r[0] + r[1]) & mask, linear(kind, spec, w.view(U64), x0) & mask))
    r["outputs"] = int(np.prod(r[0].shape))
    r["n"], r["plain_bits"] = params.n, params.plain_bits
    return r


def he_conv(quick: bool) -> None:
    c, hw, m = (32, 28, 16) if quick else (128, 56, 32)
    spec = ConvSpec((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    r = measure_he_layer("conv", spec, (1, c, hw, hw), (m, c, 3, 3))
    print(f"HE conv {c}x{hw}x{hw} -> {m} ch 3x3 pad 1 (N={r['n']}, t=2^{r['plain_bits']}): exact={r['exact']}")
    print(f"  wall {r['wall']:.2f} s (CPU data owner {r['cpu0']:.2f} s, model owner {r['cpu1']:.2f} s); "
          f"sent: data owner {r['bytes'][0] / 1e6:.1f} MB, model owner {r['bytes'][1] / 1e6:.1f} MB; "
          f"{sum(r['bytes']) / r['outputs']:.0f} B per output element (both parties)")


def ot16(quick: bool) -> None:
    n = 20_000 if quick else 200_000
    rng = np.random.default_rng(1)
    tables = rng.integers(0, 4, (n, 16)).astype(np.uint8)
    choices = rng.integers(0, 16, n).astype(np.uint8)
    sessions: dict[int, Any] = {}
    setup = two(lambda ch: sessions.__setitem__(0, ot_setup(ch, "s", PRG.fresh(), True)),
                lambda ch: sessions.__setitem__(1, ot_setup(ch, "s", PRG.fresh(), False)))
    print(f"OT set-up (128 base OTs each way, Curve25519): wall {setup['wall'] * 1e3:.0f} ms, "
          f"{setup['bytes'][0] / 1e3:.1f} kB per party")
    r = two(lambda ch: ot16_send(_rebind(sessions[0], ch), "t", tables, 2), lambda ch: ot16_recv(_rebind(sessions[1], ch), "t", choices, 2))
    assert np.array_equal(r[1], tables[np.arange(n), choices])
    print(f"1-of-16 OT (2-bit messages), {n} chunks: {r['wall'] / n * 1e6:.2f} us per chunk (wall), CPU "
          f"{r['cpu0'] / n * 1e6:.2f} (sender) + {r['cpu1'] / n * 1e6:.2f} (receiver) us; "
          f"bytes per chunk: sender {r['bytes'][0] / n:.1f}, receiver {r['bytes'][1] / n:.1f}")


def _rebind(ot: Any, ch: Channel) -> Any:
    """Reuse an OT session's base OTs on a fresh channel pair (benchmark only: per-run counters)."""
    ot.ch = ch
    return ot


def relu_twoparty(quick: bool) -> None:
    n = 20_000 if quick else 100_000
    rng = np.random.default_rng(2)
    for bits in (37, 64):
        _relu_once(n, bits, rng)


def _relu_once(n: int, bits: int, rng: np.random.Generator) -> None:
    mask = U64((1 << bits) - 1)
    x = rng.integers(-(2 ** (bits - 2)), 2 ** (bits - 2), n, dtype=np.int64)
    x0 = rng.integers(0, 2**63, n, dtype=U64) & mask
    x1 = (x.view(U64) - x0) & mask
    sessions: dict[int, Any] = {}
    two(lambda ch: sessions.__setitem__(0, ot_setup(ch, "s", PRG.fresh(), True)),
        lambda ch: sessions.__setitem__(1, ot_setup(ch, "s", PRG.fresh(), False)))
    r = two(lambda ch: cmp.relu(_rebind(sessions[0], ch), "r", True, x0, bits, PRG.fresh().stream("p")),
            lambda ch: cmp.relu(_rebind(sessions[1], ch), "r", False, x1, bits, PRG.fresh().stream("p")))
    ok = np.array_equal((r[0] + r[1]) & mask, np.maximum(x, 0).view(U64) & mask)
    print(f"two-party ReLU over Z_2^{bits}, n={n}: exact={ok}; {r['wall'] / n * 1e6:.1f} us per element (wall), CPU "
          f"{r['cpu0'] / n * 1e6:.1f} (data owner) + {r['cpu1'] / n * 1e6:.1f} (model owner) us; "
          f"bytes per element: data owner {r['bytes'][0] / n:.0f}, model owner {r['bytes'][1] / n:.0f}")
    mats: dict[int, Any] = {}
    r = two(lambda ch: mats.__setitem__(0, offline.relu_offline(_rebind(sessions[0], ch), "o", True, n, bits, PRG.fresh().stream("p"))),
            lambda ch: mats.__setitem__(1, offline.relu_offline(_rebind(sessions[1], ch), "o", False, n, bits, PRG.fresh().stream("p"))))
    off = r
    r = two(lambda ch: offline.relu_online(ch, "o", True, x0, mats[0]), lambda ch: offline.relu_online(ch, "o", False, x1, mats[1]))
    ok = np.array_equal((r[0] + r[1]) & mask, np.maximum(x, 0).view(U64) & mask)
    print(f"  split: exact={ok}; offline CPU {off['cpu0'] / n * 1e6:.1f} + {off['cpu1'] / n * 1e6:.1f} us, bytes "
          f"{off['bytes'][0] / n:.0f} + {off['bytes'][1] / n:.0f}; online {r['wall'] / n * 1e6:.2f} us per element (wall), "
          f"CPU {r['cpu0'] / n * 1e6:.2f} + {r['cpu1'] / n * 1e6:.2f} us, bytes data owner {r['bytes'][0] / n:.1f}, "
          f"model owner {r['bytes'][1] / n:.1f}")
    r = two(lambda ch: offline.relu_offline(_rebind(sessions[0], ch), "d", True, n, bits, PRG.fresh().stream("p"), 12),
            lambda ch: offline.relu_offline(_rebind(sessions[1], ch), "d", False, n, bits, PRG.fresh().stream("p"), 12))
    print(f"  comparison ignoring the low 12 bits (drop=12): offline bytes {r['bytes'][0] / n:.0f} + {r['bytes'][1] / n:.0f} "
          f"per element, CPU {r['cpu0'] / n * 1e6:.1f} + {r['cpu1'] / n * 1e6:.1f} us")
    r = two(lambda ch: cmp.truncate(_rebind(sessions[0], ch), "t", True, x0, bits, 12),
            lambda ch: cmp.truncate(_rebind(sessions[1], ch), "t", False, x1, bits, 12))
    got = ((r[0] + r[1]) << U64(64 - bits)).view(np.int64) >> (64 - bits)
    ok = set(np.unique(got - (x >> 12)).tolist()) <= {-1, 0}
    print(f"two-party truncation by 12 over Z_2^{bits}, n={n}: floor or floor-1={ok}; {r['wall'] / n * 1e6:.2f} us per "
          f"element (wall), CPU {r['cpu0'] / n * 1e6:.2f} + {r['cpu1'] / n * 1e6:.2f} us; bytes per element: "
          f"data owner {r['bytes'][0] / n:.1f}, model owner {r['bytes'][1] / n:.1f}")


def triples(quick: bool) -> None:
    n = 5_000 if quick else 20_000
    for bits in (37, 64):
        _triples_once(n, bits)


def _triples_once(n: int, bits: int) -> None:
    sessions: dict[int, Any] = {}
    two(lambda ch: sessions.__setitem__(0, ot_setup(ch, "s", PRG.fresh(), True)),
        lambda ch: sessions.__setitem__(1, ot_setup(ch, "s", PRG.fresh(), False)))
    r = two(lambda ch: arith.beaver_triples(_rebind(sessions[0], ch), "t", True, n, bits, PRG.fresh().stream("p")),
            lambda ch: arith.beaver_triples(_rebind(sessions[1], ch), "t", False, n, bits, PRG.fresh().stream("p")))
    mask = U64((1 << bits) - 1)
    a, b, c = (((u + v) & mask) for u, v in zip(r[0], r[1], strict=True))
    ok = np.array_equal(c, (a * b) & mask)
    print(f"Beaver triple over Z_2^{bits} by Gilboa OT (offline), n={n}: correct={ok}; CPU {r['cpu0'] / n * 1e6:.1f} + "
          f"{r['cpu1'] / n * 1e6:.1f} us, bytes {r['bytes'][0] / n:.0f} + {r['bytes'][1] / n:.0f} per triple")


def relu_dealer(quick: bool) -> None:
    """The dealer mode's ReLU as tests/protocol/test_nonlinear.py runs it (bits 40, shift 16)."""
    try:
        from privmed.crypto.prg import StreamKey
        from privmed.mpc import compare as nl
        from privmed.mpc.correlation.dealer import serve
        from privmed.mpc.correlation.requests import NonlinearSpec, Purpose, Request
        from privmed.mpc.correlation.source import DealerSource
        from privmed.mpc.party import Party
    except ImportError as exc:
        print(f"dealer ReLU: not measured ({exc})")
        return
    n = 20_000 if quick else 100_000
    spec = NonlinearSpec(n, 16, 40, 16, True)
    req = Request("L", StreamKey(0, 0, Purpose.NONLINEAR), 0, nonlinear=spec)
    s0, s1 = PRG.fresh().seed, PRG.fresh().seed
    d_ch, p1_dealer = in_process_pair("dealer", "model-owner", bytes(16), 60)
    start = time.perf_counter()
    serve(req, (PRG(s0), PRG(s1), PRG.fresh()), d_ch)
    dealer_s = time.perf_counter() - start
    x = np.random.default_rng(3).integers(-(2**38), 2**38, n, dtype=np.int64).view(U64)
    x0 = PRG.fresh().stream("x").uint64(n)
    shares = (x0, x - x0)
    r = two(lambda ch: nl.relu(Party(0, ch, DealerSource(0, s0, None)), req, shares[0]),
            lambda ch: nl.relu(Party(1, ch, DealerSource(1, s1, p1_dealer)), req, shares[1]))
    got = (r[0][0] + r[1][0]).view(np.int64)
    ok = bool(np.all(np.abs(got - np.maximum(x.view(np.int64) >> 16, 0)) <= 1))
    print(f"dealer ReLU (40-bit comparison, truncation by 16), n={n}: within 1 ulp={ok}; {r['wall'] / n * 1e6:.2f} us per element "
          f"(wall, parties; CPU {r['cpu0'] / n * 1e6:.2f} + {r['cpu1'] / n * 1e6:.2f} us) + dealer {dealer_s / n * 1e6:.2f} us; bytes per element: data owner {r['bytes'][0] / n:.1f}, "
          f"model owner {r['bytes'][1] / n:.1f}, dealer {d_ch.counters.bytes_sent / n:.1f}")


def conv_dealer(quick: bool) -> None:
    """Dealer-mode conv: the three ring products private_linear and the dealer compute, timed
    with privmed.ring.linalg.linear; bytes are the protocol's message sizes (not a full run)."""
    c, hw, m = (32, 28, 16) if quick else (128, 56, 32)
    spec = ConvSpec((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    prg = PRG.fresh().stream("d")
    a, b = prg.uint64((1, c, hw, hw)), prg.uint64((m, c, 3, 3))
    w = np.random.default_rng(4).integers(-(2**11), 2**11, (m, c, 3, 3), dtype=np.int64).view(U64)
    times = []
    for wb in (None, None, 12):  # dealer L(B, A); data owner L(F, A); model owner L(W, E + x1)
        start = time.perf_counter()
        out = linear("conv", spec, w if wb else b, a, w_bits=wb)
        times.append(time.perf_counter() - start)
    print(f"dealer conv {c}x{hw}x{hw} -> {m} ch: compute dealer {times[0]:.2f} s, data owner {times[1]:.2f} s, "
          f"model owner {times[2]:.2f} s; sent: data owner {a.nbytes / 1e6:.1f} MB, model owner {b.nbytes / 1e6:.2f} MB "
          f"(once per session), dealer {out.nbytes / 1e6:.1f} MB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--skip-he", action="store_true", help="skip the HE layer (tenseal missing)")
    args = parser.parse_args()
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, load average {load}, numpy {np.__version__}")
    if not args.skip_he:
        he_conv(args.quick)
    conv_dealer(args.quick)
    ot16(args.quick)
    relu_twoparty(args.quick)
    triples(args.quick)
    relu_dealer(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
