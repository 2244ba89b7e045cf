"""BFV parameters and raw numpy <-> SEAL conversion (TenSEAL's ``sealapi``, imported lazily).

Parameter set (``HEParams()``): N = 8192, ciphertext modulus q = q0 q1 q2 with three 60-bit
primes (180 bits), a 38-bit special prime (total 218 bits; it only serves key generation here,
as no key switching is ever done), plaintext modulus t = 2^l (default l = 37), ternary secret,
error sigma = 3.2. Replies are decrypted under q0 q1 (120 bits) after dropping q2. The HE standard (Albrecht et al., "Homomorphic
Encryption Security Standard", 2018, the tables for a uniform ternary secret) allows log2(q) <= 218 for
N = 8192 at 128-bit classical security, so this is a 128-bit parameter set; SEAL's own check
(``sec_level_type.tc128``) is enabled when the context is built.

Wire format: the data owner's fresh symmetric encryptions travel as SEAL's own seeded
serialization (c1 replaced by the PRNG seed it is expanded from, zstd-compressed: about half
of the raw size), preceded by a uint64 array of their lengths; the receiver bounds each length,
lets SEAL validate the blob against the context, and checks size, level and form. Everything
else travels as RNS coefficients, uint64 arrays of shape (..., k, N) (prime, coefficient;
coefficient form), k = number of primes at its level, checked to be below their primes. The
public key travels that way too, shape (2, 4, N), in NTT form (SEAL's storage).
SEAL's Python binding has no buffer access, so objects move through SEAL's own uncompressed
serialization in a private temporary directory (``SealIO``, on tmpfs when available).

Randomness: the protocol's masks and flooding noise come from ``privmed.crypto.prg``; SEAL's
own (secret key, encryption noise, the seed of c1, Enc_pk(0)) from its default Blake2xb PRNG,
which SEAL seeds from the operating system (``std::random_device``).
"""

from __future__ import annotations

import os
import struct
import tempfile
from dataclasses import dataclass
from typing import Any

import numpy as np

from privmed.errors import ProtocolError

U64 = np.uint64


def import_sealapi() -> Any:
    """The ``tenseal.sealapi`` module, or an ImportError naming the extra that provides it."""
    try:
        import tenseal.sealapi as sealapi
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the two-party HE layers need tenseal: pip install 'privmed[twoparty]'") from exc
    return sealapi


@dataclass(frozen=True)
class HEParams:
    """Public BFV parameters both parties agree on (see the module docstring)."""

    n: int = 8192
    plain_bits: int = 37
    data_bits: tuple[int, ...] = (60, 60, 60)  # the last one is dropped before the reply
    special_bits: int = 38
    flood_sigma: int = 40  # reply within 2^-(sigma + 1) of one whose noise is independent of W
    max_weight_bits: int = 16  # |w| < 2^16 (fixed-point weights; checked)

    @property
    def reply_bits(self) -> int:
        """log2 of the modulus the reply ciphertext is decrypted under (all but the last prime)."""
        return sum(self.data_bits[:-1])


def _seal_header(raw: bytes) -> tuple[int, int] | None:
    """(compression mode, total size) of a SEALHeader (magic 0xA15E, 16 bytes), else None."""
    if len(raw) < 16:
        return None
    magic, header_size, _major, _minor, mode, _reserved, size = struct.unpack_from("<HBBBBHQ", raw)
    return (mode, size) if magic == 0xA15E and header_size == 16 else None


_ZSTD_MAGIC = 0xFD2FB528


def _zstd_stored(frame: bytes) -> bytes | None:
    """The content of one zstd frame (RFC 8878, sec. 3.1.1) whose blocks are all raw or RLE
    (stored, not entropy-coded), else None: what zstd emits for incompressible data, read
    without a zstd library. Checksum and dictionary fields are skipped (our own objects)."""
    if len(frame) < 6 or struct.unpack_from("<I", frame)[0] != _ZSTD_MAGIC:
        return None
    fhd = frame[4]
    fcs_flag, single, checksum, dict_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[dict_flag] + ((1 if single else 0), 2, 4, 8)[fcs_flag]
    parts: list[bytes] = []
    while pos + 3 <= len(frame):
        header = int.from_bytes(frame[pos : pos + 3], "little")
        last, kind, size = header & 1, (header >> 1) & 3, header >> 3
        pos += 3
        if kind == 0:  # raw
            if pos + size > len(frame):
                return None
            parts.append(frame[pos : pos + size])
            pos += size
        elif kind == 1:  # RLE: one byte repeated
            if pos + 1 > len(frame):
                return None
            parts.append(frame[pos : pos + 1] * size)
            pos += 1
        else:  # compressed (or reserved): needs a real decoder
            return None
        if last:
            return b"".join(parts) if pos + 4 * checksum == len(frame) else None
    return None


def _seal_body(raw: bytes) -> bytes | None:
    """The uncompressed body of a SEAL serialization (mode none, or zstd with stored blocks)."""
    head = _seal_header(raw)
    if head is None or head[1] != len(raw):
        return None
    if head[0] == 0:
        return raw[16:]
    return _zstd_stored(raw[16:]) if head[0] == 2 else None


class SealIO:
    """A SEAL context for ``HEParams`` plus raw conversions; owns a private temporary folder."""

    def __init__(self, params: HEParams) -> None:
        s = import_sealapi()
        self.s, self.params = s, params
        enc = s.EncryptionParameters(s.SCHEME_TYPE.BFV)
        enc.set_poly_modulus_degree(params.n)
        enc.set_coeff_modulus(s.CoeffModulus.Create(params.n, list(params.data_bits) + [params.special_bits]))
        enc.set_plain_modulus(1 << params.plain_bits)
        self.ctx = s.SEALContext(enc, True, s.SEC_LEVEL_TYPE.TC128)
        if not self.ctx.parameters_set():
            raise ValueError(f"SEAL rejected {params}: {self.ctx.parameters_error_message()}")
        self.evaluator = s.Evaluator(self.ctx)
        self.primes = [m.value() for m in self.ctx.key_context_data().parms().coeff_modulus()]
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self._dir = tempfile.TemporaryDirectory(prefix="privmed-he-", dir=shm)  # tmpfs: no disk I/O
        probe = s.Plaintext("1")
        probe.save(self._path("probe"))
        with open(self._path("probe"), "rb") as f:
            self._version = f.read(16)[3:5]  # SEAL's own version bytes, echoed in our headers

    def close(self) -> None:
        self._dir.cleanup()

    def _path(self, name: str) -> str:
        return os.path.join(self._dir.name, name)

    # -- SEAL serialization, uncompressed (SEALHeader: magic, size, version, mode, size) --------
    def _header(self, body_len: int) -> bytes:
        return struct.pack("<HBBBBHQ", 0xA15E, 16, self._version[0], self._version[1], 0, 0, 16 + body_len)

    def _dynarray(self, values: np.ndarray) -> bytes:
        body = struct.pack("<Q", values.size) + np.ascontiguousarray(values, dtype="<u8").tobytes()
        return self._header(len(body)) + body

    def _load(self, obj: Any, name: str, body: bytes) -> Any:
        path = self._path(name)
        with open(path, "wb") as f:
            f.write(self._header(len(body)) + body)
        obj.load(self.ctx, path)
        return obj

    def plaintext(self, coeffs: np.ndarray) -> Any:
        """A SEAL plaintext with the given coefficients (uint64, each < t, at most N of them)."""
        body = struct.pack("<4QQd", 0, 0, 0, 0, coeffs.size, 1.0) + self._dynarray(coeffs)
        return self._load(self.s.Plaintext(), "pt", body)

    def plain_coeffs(self, pt: Any, where: np.ndarray | None = None) -> np.ndarray:
        """The N coefficients of a plaintext (SEAL may store fewer: the rest are zero); with
        ``where`` (sorted indices), only those are read and the others left zero: SEAL's
        binding gives one coefficient per call, so a reply's T results cost T calls, not N."""
        out = np.zeros(self.params.n, dtype=U64)
        count = pt.coeff_count()
        arr = pt.dyn_array()
        idx = np.arange(count) if where is None else where[where < count]
        out[idx] = np.fromiter(map(arr.at, idx.tolist()), dtype=U64, count=len(idx))
        return out

    def ct_array(self, ct: Any) -> np.ndarray:
        """Raw RNS data (size, k, N) of a ciphertext (our own object, not a peer's).

        Read from SEAL's own serialization when its zstd frame holds only stored blocks (what
        SEAL writes for coefficients uniform modulo 60-bit primes, which zstd cannot shrink):
        about 0.2 ms instead of 6 ms for the element-by-element ``DynArray.at`` path, which
        stays the fallback for any other frame (same values either way; a test compares)."""
        shape = (ct.size(), ct.coeff_modulus_size(), self.params.n)
        fast = self._ct_data(ct, shape)
        if fast is not None:
            return fast
        arr = ct.dyn_array()
        return np.fromiter(map(arr.at, range(arr.size())), dtype=U64, count=arr.size()).reshape(shape)

    def _ct_data(self, ct: Any, shape: tuple[int, int, int]) -> np.ndarray | None:
        """``ct_array`` from ``ct.save``: SEALHeader (16 B), then the members (parms_id 32 B,
        is_ntt_form 1 B, size, N, k, scale, correction factor: 8 B each) and the data as a
        DynArray (its own 16 B header, count, the uint64 values); None if anything differs."""
        path = self._path("ct-out")
        ct.save(path)
        with open(path, "rb") as f:
            raw = f.read()
        body = _seal_body(raw)
        count = shape[0] * shape[1] * shape[2]
        members = 32 + 1 + 5 * 8
        if body is None or len(body) != members + 16 + 8 + 8 * count:
            return None
        size, n, k = struct.unpack_from("<QQQ", body, 33)
        inner = _seal_header(body[members : members + 16])
        if (size, k, n) != shape or inner != (0, 16 + 8 + 8 * count) or struct.unpack_from("<Q", body, members + 16)[0] != count:
            return None
        return np.frombuffer(body, dtype="<u8", count=count, offset=members + 24).astype(U64).reshape(shape)

    def ciphertext(self, data: np.ndarray, parms_id: list[int], ntt: bool = False) -> Any:
        """A SEAL ciphertext from raw RNS data (size, k, N); entries must be below their primes."""
        size, k, n = data.shape
        body = struct.pack("<4Q", *parms_id) + bytes([int(ntt)]) + struct.pack("<QQQdQ", size, n, k, 1.0, 1)
        return self._load(self.s.Ciphertext(self.ctx), "ct", body + self._dynarray(data))

    def public_key(self, data: np.ndarray) -> Any:
        body = struct.pack("<4Q", *self.ctx.key_parms_id()) + bytes([1])
        body += struct.pack("<QQQdQ", 2, self.params.n, len(self.primes), 1.0, 1) + self._dynarray(data)
        return self._load(self.s.PublicKey(), "pk", body)

    def to_bytes(self, obj: Any) -> bytes:
        """SEAL's own serialization of a ciphertext or seeded ciphertext (zstd-compressed)."""
        path = self._path("out")
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()

    def load_fresh_ciphertext(self, blob: bytes, what: str) -> Any:
        """A peer's fresh encryption at the first level, validated by SEAL and by shape checks."""
        path = self._path("in")
        with open(path, "wb") as f:
            f.write(blob)
        ct = self.s.Ciphertext(self.ctx)
        try:
            ct.load(self.ctx, path)
        except Exception as exc:  # noqa: BLE001 - SEAL raises several types for invalid data
            raise ProtocolError(f"{what}: SEAL rejected the ciphertext ({exc})") from None
        k = len(self.params.data_bits)
        if ct.size() != 2 or ct.coeff_modulus_size() != k or ct.is_ntt_form():
            raise ProtocolError(f"{what}: expected a fresh 2-component ciphertext with {k} primes")
        return ct

    def check_rns(self, data: np.ndarray, what: str) -> None:
        """Reject a peer's ciphertext whose entries are not reduced modulo their primes."""
        bound = np.array(self.primes[: data.shape[-2]], dtype=U64).reshape(-1, 1)  # (..., k, N)
        if np.any(data >= bound):
            raise ProtocolError(f"{what}: expected coefficients reduced modulo the RNS primes, got larger ones")

    def rns(self, signed: np.ndarray, k: int) -> np.ndarray:
        """Signed integers (|v| < 2^62) as residues modulo the first k primes: (k, len)."""
        q = np.array(self.primes[:k], dtype=np.int64).reshape(-1, 1)
        return np.mod(signed.reshape(1, -1), q).astype(U64)
