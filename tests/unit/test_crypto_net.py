"""PRG determinism and the wire header's checks."""

from __future__ import annotations

import numpy as np
import pytest

from privmed.crypto.prg import PRG
from privmed.errors import PeerError, ProtocolError
from privmed.net.channel import in_process_pair
from privmed.net.frame import HEADER_BYTES, check_header, pack_header, unpack_header


def test_prg_streams_are_deterministic_per_seed_and_label() -> None:
    seed = bytes(range(16))
    a = PRG(seed).stream("L1/relu").uint64(1000)
    b = PRG(seed).stream("L1/relu").uint64(1000)
    c = PRG(seed).stream("L2/relu").uint64(1000)
    d = PRG(bytes(16)).stream("L1/relu").uint64(1000)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    bits = PRG(seed).stream("bits").bits(100_000)
    assert set(np.unique(bits)) == {0, 1} and abs(bits.mean() - 0.5) < 0.01  # 6 sigma = 0.0095
    with pytest.raises(ValueError):
        PRG(b"short")


def test_header_round_trip() -> None:
    arr = np.arange(12, dtype=np.uint64).reshape(3, 4)
    hdr = unpack_header(pack_header(b"s" * 16, 7, "L3/relu/c", arr))
    assert (hdr.seq, hdr.tag, hdr.shape, hdr.dtype, hdr.length) == (7, "L3/relu/c", (3, 4), np.dtype("<u8"), 96)
    assert len(pack_header(b"s" * 16, 0, "t", arr)) == HEADER_BYTES == 136


@pytest.mark.parametrize(
    "field,kwargs,needle",
    [
        ("tag", {"tag": "other"}, "tag"),
        ("seq", {"seq": 8}, "sequence"),
        ("shape", {"shape": (4, 3)}, "shape"),
        ("dtype", {"dtype": np.dtype("u1")}, "dtype"),
        ("session", {"session": b"x" * 16}, "session"),
    ],
)
def test_header_mismatch_names_peer_and_field(field: str, kwargs: dict, needle: str) -> None:
    arr = np.zeros((3, 4), dtype=np.uint64)
    hdr = unpack_header(pack_header(b"s" * 16, 7, "L3", arr))
    expect = {"session": b"s" * 16, "seq": 7, "tag": "L3", "dtype": np.dtype("<u8"), "shape": (3, 4)} | kwargs
    with pytest.raises(ProtocolError, match=needle) as err:
        check_header(hdr, peer="model-owner", **expect)
    assert "model-owner" in str(err.value)


def test_bad_magic_is_rejected() -> None:
    raw = bytearray(pack_header(b"s" * 16, 0, "t", np.zeros(1, np.uint64)))
    raw[:4] = b"HTTP"
    with pytest.raises(ProtocolError, match="magic"):
        unpack_header(bytes(raw))


def test_recv_deadline_names_peer_and_step() -> None:
    a, _b = in_process_pair("data-owner", "model-owner", b"s" * 16, timeout_s=0.2)
    a.step = "layer n7_relu (/Relu)"
    with pytest.raises(PeerError, match=r"model-owner did not send .* \(during layer n7_relu"):
        a.recv("x", np.uint64, (1,))


def test_abort_from_peer_is_reported_with_reason() -> None:
    a, b = in_process_pair("data-owner", "model-owner", b"s" * 16, timeout_s=1)
    b.abort("model owner could not compile")
    with pytest.raises(PeerError, match="model-owner aborted the session: model owner could not compile"):
        a.recv("plan", np.uint8, None, max_bytes=1 << 20)


def test_failure_group_names_the_peer_that_dropped_first():
    import time

    from privmed.net.channel import FailureGroup

    group = FailureGroup()
    assert group.earlier_losses("model-owner") == ""
    group.note_lost("data-owner")
    time.sleep(0.01)
    group.note_lost("model-owner")
    group.note_lost("data-owner")  # recorded once: the first drop counts
    assert group.earlier_losses("model-owner").startswith("; data-owner had disconnected 0.0")
    assert group.earlier_losses("data-owner") == ""  # nobody went before it
    assert group.reason is None  # a drop alone does not fail the party's other waits
