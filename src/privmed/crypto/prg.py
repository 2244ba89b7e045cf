"""Pseudorandom generator: AES-128 in counter mode, keyed by a 16-byte seed.

All protocol randomness in privmed comes from here. A ``PRG`` is keyed by a seed drawn from
``os.urandom`` (``PRG.fresh()``) or agreed with a peer (the dealer sends each party its seed
over the mutually authenticated TLS channel). ``stream(label)`` gives an independent stream per
label: the CTR nonce is the first 16 bytes of SHA-256(label), so two parties that share a seed
and a label expand identical bytes without any ordering constraint between labels.

Security: for a uniformly random key, AES-CTR output is indistinguishable from uniform as long
as no (key, nonce, counter) repeats; labels are unique per session and per use (the protocol
code includes layer id and purpose in each label), and a stream never exceeds 2^64 blocks.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 16


class PRG:
    """AES-128-CTR keyed by ``seed``; ``stream(label)`` returns a ``Stream``."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != SEED_BYTES:
            raise ValueError(f"PRG seed must be {SEED_BYTES} bytes, got {len(seed)}")
        self._seed = bytes(seed)

    @classmethod
    def fresh(cls) -> PRG:
        return cls(os.urandom(SEED_BYTES))

    @property
    def seed(self) -> bytes:
        return self._seed

    def stream(self, label: str) -> Stream:
        nonce = hashlib.sha256(label.encode()).digest()[:16]
        return Stream(Cipher(algorithms.AES(self._seed), modes.CTR(nonce)).encryptor())


class Stream:
    """A sequence of pseudorandom bytes, consumed in order."""

    def __init__(self, encryptor) -> None:  # type: ignore[no-untyped-def]
        self._enc = encryptor

    def bytes(self, n: int) -> bytearray:
        """n keystream bytes (AES-CTR of zeros), written straight into a new buffer."""
        out = bytearray(n + 15)
        self._enc.update_into(memoryview(bytearray(n)), out)
        del out[n:]
        return out

    def uint64(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform elements of Z_2^64."""
        count = int(np.prod(shape))
        return np.frombuffer(self.bytes(8 * count), dtype=np.uint64).reshape(shape)

    def uint8(self, shape: tuple[int, ...] | int) -> np.ndarray:
        count = int(np.prod(shape))
        return np.frombuffer(self.bytes(count), dtype=np.uint8).reshape(shape)

    def uint16(self, shape: tuple[int, ...] | int) -> np.ndarray:
        count = int(np.prod(shape))
        return np.frombuffer(self.bytes(2 * count), dtype=np.uint16).reshape(shape)

    def bits(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform bits as a uint8 array of 0/1."""
        count = int(np.prod(shape))
        packed = np.frombuffer(self.bytes((count + 7) // 8), dtype=np.uint8)
        return np.unpackbits(packed, count=count).reshape(shape)
