"""Pseudorandom generator: AES-128 in counter mode, keyed by a 16-byte seed.

All protocol randomness in privmed comes from here. A ``PRG`` is keyed by a seed drawn from
``os.urandom`` (``PRG.fresh()``) or agreed with a peer (the dealer sends each party its seed
over the mutually authenticated TLS channel). ``stream(key)`` gives an independent stream per
key, so two parties that share a seed and a key expand identical bytes without any ordering
constraint between keys.

Stream keys. Protocol material is keyed by a ``StreamKey`` (batch, node index, purpose, step):
the initial counter block is the fixed-width big-endian encoding

    0x01 | batch (4 bytes) | node (4) | purpose (1) | step (2) | 0x00000000 (block counter)

Each field is range-checked, so the map from keys to the first 12 bytes is injective; a stream
is capped at 2^32 blocks (64 GiB), so its counter runs through the last 4 bytes only and never
reaches another key's blocks. Hence, under one seed, two distinct keys never share a single AES
input block. (Text labels, for material outside the two-party protocols such as DP noise, start
at 0x00 followed by 15 bytes of SHA-256(label): a separate domain, 2^120 blocks away from the
first structured block.)

Security: for a uniformly random key, AES-CTR output is indistinguishable from uniform as long
as no (key, counter block) repeats, which the encoding above guarantees.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SEED_BYTES = 16
MAX_STREAM_BYTES = 16 << 32  # 2^32 AES blocks: the counter stays in the last 4 bytes
SESSION = 0xFFFFFFFF  # StreamKey.batch of material fixed for a whole session
_ZERO_CHUNK = 1 << 18  # plaintext block of AES-CTR per call: stays in cache
_ZEROS = memoryview(bytes(_ZERO_CHUNK))


@dataclass(frozen=True)
class StreamKey:
    """The structured key of one stream of protocol material (see the module docstring)."""

    batch: int  # batch number in the session, or SESSION
    node: int  # index of the node in the plan
    purpose: int  # what the material is for (``privmed.mpc.correlation.requests.Purpose``)
    step: int = 0  # sub-step within the node (max-pool level, normalisation step)

    def __post_init__(self) -> None:
        for name, value, bits in (("batch", self.batch, 32), ("node", self.node, 32), ("purpose", self.purpose, 8), ("step", self.step, 16)):
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < (1 << bits):
                raise ValueError(f"stream key {name} {value!r} outside [0, 2^{bits})")

    def counter_block(self) -> bytes:
        return b"\x01" + struct.pack(">IIBH", self.batch, self.node, self.purpose, self.step) + bytes(4)


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

    def stream(self, key: StreamKey | str) -> Stream:
        if isinstance(key, StreamKey):
            block, limit = key.counter_block(), MAX_STREAM_BYTES
        else:
            block, limit = b"\x00" + hashlib.sha256(key.encode()).digest()[:15], None
        return Stream(Cipher(algorithms.AES(self._seed), modes.CTR(block)).encryptor(), limit)


class Stream:
    """A sequence of pseudorandom bytes, consumed in order."""

    def __init__(self, encryptor, limit: int | None = None) -> None:  # type: ignore[no-untyped-def]
        self._enc = encryptor
        self._limit = limit
        self._used = 0

    def _keystream(self, n: int) -> np.ndarray:
        """n keystream bytes (AES-CTR of zeros) as a new uint8 array: encrypted from a shared
        all-zero block of ``_ZERO_CHUNK`` bytes straight into the (uninitialised) result, so no
        buffer is zeroed or copied per call."""
        self._used += n
        if self._limit is not None and self._used > self._limit:
            raise ValueError(f"PRG stream exhausted: more than {self._limit} bytes from one key")
        out = np.empty(n + 16, dtype=np.uint8)  # update_into needs 15 bytes of room past the data
        view = memoryview(out)  # type: ignore[arg-type]  # numpy arrays export the buffer protocol
        for pos in range(0, n, _ZERO_CHUNK):
            k = min(_ZERO_CHUNK, n - pos)
            self._enc.update_into(_ZEROS[:k], view[pos:])
        return out[:n]

    def bytes(self, n: int) -> bytearray:
        """n keystream bytes (AES-CTR of zeros)."""
        return bytearray(self._keystream(n))

    def uint64(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform elements of Z_2^64."""
        count = int(np.prod(shape))
        return self._keystream(8 * count).view(np.uint64).reshape(shape)

    def uint8(self, shape: tuple[int, ...] | int) -> np.ndarray:
        count = int(np.prod(shape))
        return self._keystream(count).reshape(shape)

    def uint16(self, shape: tuple[int, ...] | int) -> np.ndarray:
        count = int(np.prod(shape))
        return self._keystream(2 * count).view(np.uint16).reshape(shape)

    def uint32(self, shape: tuple[int, ...] | int) -> np.ndarray:
        count = int(np.prod(shape))
        return self._keystream(4 * count).view(np.uint32).reshape(shape)

    def bits(self, shape: tuple[int, ...] | int) -> np.ndarray:
        """Uniform bits as a uint8 array of 0/1."""
        count = int(np.prod(shape))
        packed = self._keystream((count + 7) // 8)
        return np.unpackbits(packed, count=count).reshape(shape)
