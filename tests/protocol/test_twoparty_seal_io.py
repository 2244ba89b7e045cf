"""SEAL <-> numpy conversions of the two-party HE layers: the fast read of SEAL's own
serialization (zstd frames of stored blocks) equals SEAL's element-by-element accessor."""

from __future__ import annotations

import struct

import numpy as np
import pytest

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

from privmed.mpc.twoparty.seal_io import HEParams, SealIO, _zstd_stored  # noqa: E402

U64 = np.uint64


def _elementwise(ct) -> np.ndarray:  # type: ignore[no-untyped-def]
    arr = ct.dyn_array()
    return np.fromiter(map(arr.at, range(arr.size())), dtype=U64, count=arr.size()).reshape(ct.size(), ct.coeff_modulus_size(), -1)


def test_ciphertext_data_read_from_serialization_equals_seal_accessor() -> None:
    # Prepare: a fresh symmetric encryption (3 primes) and the same after a modulus switch (2)
    io = SealIO(HEParams(plain_bits=42))
    s, n = io.s, io.params.n
    secret = s.KeyGenerator(io.ctx).secret_key()
    ct = s.Ciphertext()
    coeffs = np.random.default_rng(1).integers(0, 1 << 42, n, dtype=U64)
    s.Encryptor(io.ctx, secret).encrypt_symmetric(io.plaintext(coeffs), ct)

    # Execute: the fast path itself (None would mean the fallback ran), before and after a switch
    got_fresh, want_fresh = io._ct_data(ct, (2, 3, n)), _elementwise(ct)
    io.evaluator.mod_switch_to_next_inplace(ct)
    got_switched, want_switched = io._ct_data(ct, (2, 2, n)), _elementwise(ct)

    # Assert
    assert got_fresh is not None and np.array_equal(got_fresh, want_fresh)
    assert got_switched is not None and np.array_equal(got_switched, want_switched)
    assert np.array_equal(io.ct_array(ct), want_switched)
    assert io._ct_data(ct, (2, 3, n)) is None  # a shape other than the object's: not read


def _frame(blocks: list[tuple[int, bytes | int, int]], checksum: bool = False) -> bytes:
    """A zstd frame: magic, descriptor (no content size, window byte), blocks (type, payload,
    size), optional 4-byte checksum."""
    out = struct.pack("<I", 0xFD2FB528) + bytes([0x04 if checksum else 0x00, 0x50])
    for i, (kind, payload, size) in enumerate(blocks):
        last = int(i == len(blocks) - 1)
        out += (last | kind << 1 | size << 3).to_bytes(3, "little")
        out += payload if isinstance(payload, bytes) else bytes([payload])
    return out + (b"\0\0\0\0" if checksum else b"")


def test_zstd_frames_of_stored_blocks_are_read_and_others_refused() -> None:
    # Raw and RLE blocks give their content; a compressed block, a cut frame or a wrong magic: None
    assert _zstd_stored(_frame([(0, b"abc", 3), (1, 7, 5), (0, b"z", 1)], checksum=True)) == b"abc" + bytes([7] * 5) + b"z"
    assert _zstd_stored(_frame([(2, b"\x00\x01", 2)])) is None
    assert _zstd_stored(_frame([(0, b"abc", 3)])[:-1]) is None
    assert _zstd_stored(b"\x00" * 12) is None


def test_plaintext_read_at_chosen_coefficients_equals_the_full_read() -> None:
    # Prepare: a plaintext SEAL stores with fewer than N coefficients (the top ones zero)
    io = SealIO(HEParams(plain_bits=42))
    coeffs = np.random.default_rng(2).integers(1, 1 << 42, 5000, dtype=U64)
    pt = io.plaintext(coeffs)
    where = np.array([0, 7, 4999, 5000, 8191])

    # Execute
    full, some = io.plain_coeffs(pt), io.plain_coeffs(pt, where)

    # Assert: the chosen ones as the full read, every other coefficient zero
    assert np.array_equal(full[:5000], coeffs) and not full[5000:].any()
    assert np.array_equal(some[where], full[where]) and np.count_nonzero(some) == 3
