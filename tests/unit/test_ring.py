"""Ring arithmetic and exact ring linear algebra against exact integer oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from privmed.ring.fixed import arith_shift, decode, encode
from privmed.ring.linalg import ConvSpec, channel_scale, conv, conv_transpose, matmul

U64 = np.uint64


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Oracle: Python big integers, reduced mod 2^64."""
    ai = a.astype(object)
    bi = b.astype(object)
    out = ai.dot(bi)
    return np.vectorize(lambda v: int(v) % (1 << 64), otypes=[object])(out).astype(U64)


@pytest.mark.parametrize("m,k,n", [(3, 5, 2), (7, 300, 9), (1, 1, 1), (2, 1100, 3)])  # 1100 > one K chunk (511)
def test_uniform_matmul_is_exact(m: int, k: int, n: int) -> None:
    rng = np.random.default_rng(k)
    a = rng.integers(0, 2**64, (m, k), dtype=U64)
    b = rng.integers(0, 2**64, (k, n), dtype=U64)
    assert np.array_equal(matmul(a, b), exact_matmul(a, b))


def test_small_weight_matmul_is_exact_including_negative_weights() -> None:
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2**64, (11, 257), dtype=U64)
    b = rng.integers(-(2**20), 2**20, (257, 6)).astype(np.int64).view(U64)
    assert np.array_equal(matmul(a, b, b_bits=21), exact_matmul(a, b))


def test_encode_decode_round_trip_and_floor_shift() -> None:
    v = np.array([-3.25, 0.0, 1e-5, 1234.5])
    assert np.allclose(decode(encode(v, 16), 16), v, atol=2**-17)
    x = encode(np.array([-1.5, 1.5]), 4)
    assert list(decode(arith_shift(x, 2), 2)) == [-1.5, 1.5]
    assert decode(arith_shift(encode(np.array([-0.0625]), 4), 4), 0)[0] == -1.0  # floor, not toward 0


def _torch_int(x: np.ndarray) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


@pytest.mark.parametrize(
    "shape,w_shape,stride,pads,dil,groups",
    [
        ((2, 4, 9, 7), (6, 2, 3, 2), (2, 1), (1, 0, 1, 1), (1, 2), 2),
        ((1, 3, 8, 8), (4, 3, 3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1),
        ((1, 4, 5, 6), (4, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 4),
    ],
)
def test_conv2d_matches_torch_on_integers(shape, w_shape, stride, pads, dil, groups) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    x = rng.integers(-50, 50, shape)
    w = rng.integers(-50, 50, w_shape)
    spec = ConvSpec(tuple(w_shape[2:]), stride, pads, dil, groups)
    y = conv(x.astype(np.int64).view(U64), w.astype(np.int64).view(U64), spec).view(np.int64)
    xp = torch.nn.functional.pad(_torch_int(x), (pads[1], pads[3], pads[0], pads[2]))
    ref = torch.nn.functional.conv2d(xp, _torch_int(w), stride=stride, dilation=dil, groups=groups)
    assert np.array_equal(y, ref.numpy().astype(np.int64))


def test_conv1d_and_conv3d_match_torch() -> None:
    rng = np.random.default_rng(2)
    x1, w1 = rng.integers(-9, 9, (2, 3, 11)), rng.integers(-9, 9, (5, 3, 3))
    y1 = conv(x1.astype(np.int64).view(U64), w1.astype(np.int64).view(U64), ConvSpec((3,), (2,), (1, 1), (1,))).view(np.int64)
    ref1 = torch.nn.functional.conv1d(_torch_int(x1), _torch_int(w1), stride=2, padding=1)
    assert np.array_equal(y1, ref1.numpy().astype(np.int64))
    x3, w3 = rng.integers(-9, 9, (1, 2, 5, 6, 4)), rng.integers(-9, 9, (3, 2, 3, 3, 3))
    y3 = conv(x3.astype(np.int64).view(U64), w3.astype(np.int64).view(U64), ConvSpec((3, 3, 3), (1, 1, 1), (1,) * 6, (1, 1, 1))).view(np.int64)
    ref3 = torch.nn.functional.conv3d(_torch_int(x3), _torch_int(w3), padding=1)
    assert np.array_equal(y3, ref3.numpy().astype(np.int64))


def test_conv_transpose_matches_torch() -> None:
    rng = np.random.default_rng(3)
    x, w = rng.integers(-9, 9, (2, 4, 5, 7)), rng.integers(-9, 9, (4, 3, 3, 2))
    spec = ConvSpec((3, 2), (2, 3), (1, 0, 1, 0), (1, 1), 2, (1, 2))
    y = conv_transpose(x.astype(np.int64).view(U64), w.astype(np.int64).view(U64), spec).view(np.int64)
    ref = torch.nn.functional.conv_transpose2d(_torch_int(x), _torch_int(w), stride=(2, 3), padding=(1, 0), output_padding=(1, 2), groups=2)
    assert y.shape == tuple(ref.shape) == (2, 6) + spec.transpose_out_shape((5, 7))
    assert np.array_equal(y, ref.numpy().astype(np.int64))


def test_channel_scale_wraps_mod_2_64() -> None:
    x = np.full((1, 2, 2), 2**63, dtype=U64)
    y = channel_scale(x, np.array([2, 3], dtype=U64))
    assert y[0, 0, 0] == 0 and y[0, 1, 0] == U64(2**63)


def test_conv_in_tiles_equals_conv_in_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    import privmed.ring.linalg as linalg

    rng = np.random.default_rng(4)
    x = rng.integers(0, 2**64, (2, 4, 9, 10, 7), dtype=U64)
    w = rng.integers(0, 2**64, (6, 2, 3, 3, 3), dtype=U64)
    spec = ConvSpec((3, 3, 3), (1, 2, 1), (1,) * 6, (1, 1, 1), 2)
    whole = conv(x, w, spec)
    monkeypatch.setattr(linalg, "TILE_ELEMENTS", 300)  # forces one output row per tile
    assert np.array_equal(conv(x, w, spec), whole)


@pytest.mark.parametrize("bits", [3, 8, 16, 20, 28, 33, 40, 41, 44, 46, 48, 50, 55, 56, 60, 63, 64])
def test_pack_keeps_exactly_the_value_mod_2_to_the_ring_and_unpack_inverts_it(bits: int) -> None:
    from privmed.ring.fixed import pack, unpack, wire_len

    for count in (1, 2, 7, 150):
        x = np.random.default_rng(bits).integers(0, 2**63, count, dtype=np.uint64) * np.uint64(3)
        buf = pack(x, bits)
        assert buf.dtype == np.uint8 and buf.shape == (wire_len(count, bits),) and buf.size == -(-count * bits // 8)
        low = x if bits == 64 else x & np.uint64((1 << bits) - 1)
        assert np.array_equal(unpack(buf, bits, count), low)
        assert np.array_equal(pack(low, bits), buf)  # nothing above bit l reaches the wire


@pytest.mark.parametrize("ring", [40, 44, 48, 64])
def test_narrow_ring_gemm_is_exact_mod_2_to_the_ring(ring: int) -> None:
    from privmed.ring.linalg import matmul

    rng = np.random.default_rng(ring)
    a = rng.integers(0, 2**63, (7, 1100), dtype=np.uint64)
    b = rng.integers(0, 2**63, (1100, 5), dtype=np.uint64)
    w = rng.integers(-(2**18), 2**18, (1100, 5)).view(np.uint64)
    mask = np.uint64((1 << ring) - 1) if ring < 64 else np.uint64(2**64 - 1)
    exact = (a @ b) & mask  # numpy's uint64 matmul wraps mod 2^64
    assert np.array_equal(matmul(a, b, ring_bits=ring) & mask, exact)
    assert np.array_equal(matmul(a, w, b_bits=19, ring_bits=ring) & mask, (a @ w) & mask)


def _unfolded_conv(x: np.ndarray, w: np.ndarray, spec: ConvSpec) -> np.ndarray:
    """Oracle for a groups=1 conv: the unfolded patches times W with numpy's uint64 matmul
    (wraps mod 2^64, no limbs)."""
    from privmed.ring.linalg import im2col

    win, out = im2col(x, spec)
    rows = np.ascontiguousarray(win).reshape(-1, w[0].size) @ w.reshape(w.shape[0], -1).T
    return np.moveaxis(rows.reshape((x.shape[0],) + tuple(out) + (w.shape[0],)), -1, 1)


@pytest.mark.parametrize("ring", [40, 44, 64])
@pytest.mark.parametrize("case", [
    ((1, 8, 7, 9), (3, 8, 3, 3), (1, 1, 1, 1), (1, 1)),  # DenseNet's 3x3, odd sizes
    ((2, 9, 6, 8), (4, 9, 3, 2), (0, 1, 2, 1), (2, 1)),  # batch 2, uneven kernel, pads and dilation
    ((1, 600, 5, 5), (3, 600, 3, 3), (1, 1, 1, 1), (1, 1)),  # C > one K chunk (511)
    ((1, 8, 5, 6, 4), (2, 8, 3, 3, 3), (1,) * 6, (1, 1, 1)),  # 3-D
])  # fmt: skip
def test_stride1_conv_by_shifted_slices_is_exact(case, ring: int) -> None:  # type: ignore[no-untyped-def]
    """``conv`` computes stride-1 convolutions with >= 8 input channels as one GEMM per kernel
    tap on shifted slices of the padded input; exact mod 2^ring for uniform weights and for
    small signed weights, against the unfolded uint64 product."""
    x_shape, w_shape, pads, dil = case
    rng = np.random.default_rng(sum(x_shape) + ring)
    spec = ConvSpec(w_shape[2:], (1,) * len(dil), pads, dil, 1)
    x = rng.integers(0, 2**64, x_shape, dtype=U64)
    mask = np.uint64((1 << ring) - 1) if ring < 64 else np.uint64(2**64 - 1)
    uniform = rng.integers(0, 2**64, w_shape, dtype=U64)
    small = rng.integers(-(2**13), 2**13, w_shape).view(U64)
    for w, bits in ((uniform, None), (small, 14)):
        got = conv(x, w, spec, w_bits=bits, ring_bits=ring)
        assert got.flags.c_contiguous
        assert np.array_equal(got & mask, _unfolded_conv(x, w, spec) & mask)
    xf = rng.standard_normal(x_shape)
    wf = rng.standard_normal(w_shape)
    want = _unfolded_conv(xf, wf, spec)
    assert np.allclose(conv(xf, wf, spec), want, rtol=1e-12, atol=1e-9 * np.abs(want).max())
