"""Wire format of one message: a fixed 136-byte header followed by raw array bytes.

Header (little-endian, ``struct`` format ``<4sBBBB16sQ32s8QQ``):

======  =====  ===========================================================
offset  bytes  field
======  =====  ===========================================================
0       4      magic ``b"PMED"``
4       1      version (1)
5       1      dtype code (see ``DTYPES``)
6       1      ndim (0..8)
7       1      reserved, 0
8       16     session id
24      8      sequence number (per direction, starts at 0, +1 per message)
32      32     tag, ASCII, NUL-padded (names the protocol step, e.g. ``L12/relu/open``)
64      64     shape: 8 x uint64, unused dims 0
128     8      payload length in bytes (= prod(shape) * itemsize)
======  =====  ===========================================================

The payload is the C-order little-endian bytes of the array. Nothing is ever pickled: a
receiver states the tag, dtype and shape it expects and ``check_header`` rejects anything else
*before* the payload is read or any buffer allocated. A message whose shape the receiver does
not know in advance (the plan's text) must name a byte cap (``max_bytes``); an ``abort`` may
carry at most ``MAX_ABORT_BYTES`` of reason. Element counts are multiplied as Python ints.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from privmed.errors import ProtocolError

MAGIC = b"PMED"
VERSION = 1
HEADER = struct.Struct("<4sBBBB16sQ32s8QQ")
HEADER_BYTES = HEADER.size  # 136
MAX_PAYLOAD = 1 << 36  # 64 GiB: anything larger is a corrupt header
MAX_ABORT_BYTES = 4096  # an abort's reason text

DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<u8"),
    2: np.dtype("u1"),
    3: np.dtype("<i8"),
    4: np.dtype("<f4"),
    5: np.dtype("<f8"),
    6: np.dtype("<u2"),
}
CODES = {dt: code for code, dt in DTYPES.items()}


@dataclass(frozen=True)
class Header:
    session: bytes
    seq: int
    tag: str
    dtype: np.dtype
    shape: tuple[int, ...]
    length: int


def pack_header(session: bytes, seq: int, tag: str, arr: np.ndarray) -> bytes:
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    code = CODES.get(np.dtype(dtype))
    if code is None:
        raise ProtocolError(f"cannot send dtype {arr.dtype} (tag {tag})")
    if arr.ndim > 8:
        raise ProtocolError(f"cannot send a {arr.ndim}-d array (tag {tag}); at most 8 dims")
    tag_b = tag.encode("ascii")
    if len(tag_b) > 32:
        raise ProtocolError(f"tag too long: {tag!r}")
    shape = list(arr.shape) + [0] * (8 - arr.ndim)
    return HEADER.pack(MAGIC, VERSION, code, arr.ndim, 0, session, seq, tag_b, *shape, arr.nbytes)


def unpack_header(buf: bytes) -> Header:
    magic, version, code, ndim, _res, session, seq, tag_b, *rest = HEADER.unpack(buf)
    shape_all, length = rest[:8], rest[8]
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: peer is not speaking the privmed protocol")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, expected {VERSION}")
    if code not in DTYPES or ndim > 8:
        raise ProtocolError(f"bad dtype code {code} or ndim {ndim}")
    dtype = DTYPES[code]
    shape = tuple(int(s) for s in shape_all[:ndim])
    if length > MAX_PAYLOAD or length != math.prod(shape) * dtype.itemsize:
        raise ProtocolError(f"payload length {length} does not match shape {shape} of {dtype}")
    return Header(session, seq, tag_b.rstrip(b"\0").decode("ascii", "replace"), dtype, shape, length)


def check_header(
    hdr: Header,
    *,
    peer: str,
    session: bytes,
    seq: int,
    tag: str,
    dtype: np.dtype,
    shape: tuple[int, ...] | None,
    max_bytes: int | None = None,
) -> None:
    """Raise ProtocolError naming the peer unless the header is exactly what was expected.

    With ``shape`` None the payload may have any shape of ``dtype`` but at most ``max_bytes``
    (required then)."""
    if hdr.tag == "abort" and tag != "abort":
        if hdr.length > MAX_ABORT_BYTES or hdr.dtype != np.dtype("u1"):
            raise ProtocolError(f"unexpected message from {peer}: an abort of {hdr.length} bytes (at most {MAX_ABORT_BYTES})")
        return  # the caller reads the reason and raises PeerError
    if shape is None and max_bytes is None:
        raise ValueError("a receive without an expected shape needs max_bytes")
    problems = []
    if hdr.session != session:
        problems.append("session id differs")
    if hdr.seq != seq:
        problems.append(f"sequence {hdr.seq}, expected {seq}")
    if hdr.tag != tag:
        problems.append(f"tag {hdr.tag!r}, expected {tag!r}")
    if hdr.dtype != np.dtype(dtype):
        problems.append(f"dtype {hdr.dtype}, expected {np.dtype(dtype)}")
    if shape is not None and hdr.shape != tuple(shape):
        problems.append(f"shape {hdr.shape}, expected {tuple(shape)}")
    if max_bytes is not None and hdr.length > max_bytes:
        problems.append(f"{hdr.length} bytes, at most {max_bytes} expected")
    if problems:
        raise ProtocolError(f"unexpected message from {peer}: " + "; ".join(problems))
