"""HE linear layers (Cheetah coefficient encoding over BFV) exact against privmed's ring
linear algebra, reduced mod 2^l, for conv (stride, padding, groups, dilation, batch) and matmul."""

from __future__ import annotations

import numpy as np
import pytest

from privmed.crypto.prg import PRG
from privmed.mpc.twoparty import compare
from privmed.mpc.twoparty.ot import ot_setup
from privmed.ring.linalg import ConvSpec, linear
from tests.protocol.twoparty_harness import run_two

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

from privmed.mpc.twoparty.he_encoding import flood_bits, geometry  # noqa: E402
from privmed.mpc.twoparty.he_linear import he_linear, he_setup, online_linear  # noqa: E402
from privmed.mpc.twoparty.seal_io import HEParams, SealIO  # noqa: E402

U64 = np.uint64


def _secure(kind: str, spec: ConvSpec | None, x_shape: tuple[int, ...], w_shape: tuple[int, ...], *, wb: int = 8, bits: int = 37, seed: int = 0, mask_only: bool = False, zero_out: int | None = None):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 2**64 - 1, x_shape, dtype=U64, endpoint=True)
    x0 = rng.integers(0, 2**64 - 1, x_shape, dtype=U64, endpoint=True)
    x1 = None if mask_only else x - x0
    w = rng.integers(-(2**wb) + 1, 2**wb, w_shape, dtype=np.int64)
    if zero_out is not None:  # an all-zero slice of the weights (a pruned channel)
        w[zero_out] = 0
    params = HEParams(plain_bits=bits)

    def data_owner(ch):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(params), ch, True)
        return he_linear(he, ch, "L1", kind, spec, x_shape, w_shape, x=x0)

    def model_owner(ch):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(params), ch, False)
        return he_linear(he, ch, "L1", kind, spec, x_shape, w_shape, x=x1, weight=w, weight_bits=wb, stream=PRG.fresh().stream("he"))

    y0, y1, chans = run_two(data_owner, model_owner, timeout_s=60)
    want = linear(kind, spec, w.view(U64), x0 if mask_only else x) & U64((1 << bits) - 1)
    return (y0 + y1) & U64((1 << bits) - 1), want, chans


def _spec(k, stride=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), groups=1) -> ConvSpec:  # type: ignore[no-untyped-def]
    return ConvSpec(tuple(k), tuple(stride), tuple(pads), tuple(dil), groups)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "spec"),
    [
        ((1, 3, 8, 8), (4, 3, 3, 3), _spec((3, 3), pads=(1, 1, 1, 1))),
        ((2, 4, 9, 11), (6, 2, 3, 3), _spec((3, 3), (2, 2), (1, 0, 1, 0), (2, 1), groups=2)),
        ((1, 300, 10, 10), (5, 300, 1, 1), _spec((1, 1))),  # several channel blocks summed
        ((1, 2, 100, 90), (3, 2, 5, 5), _spec((5, 5), (1, 2), (2, 2, 2, 2))),  # several spatial tiles
        ((1, 4, 7, 7), (4, 1, 3, 3), _spec((3, 3), pads=(1, 1, 1, 1), groups=4)),  # depthwise
        ((1, 3, 30, 29), (4, 3, 7, 7), _spec((7, 7), (2, 2), (3, 3, 3, 3))),  # a stem: space-to-depth
        ((1, 2, 17, 16), (3, 2, 4, 3), _spec((4, 3), (3, 2), (0, 1, 2, 0), (2, 1))),  # stride 3, dilated
    ],
)
def test_he_conv_is_exact_mod_2_to_the_l(x_shape, w_shape, spec) -> None:  # type: ignore[no-untyped-def]
    # Execute
    got, want, _ = _secure("conv", spec, x_shape, w_shape)

    # Assert
    assert got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize(("x_shape", "w_shape"), [((2, 20), (20, 7)), ((1, 3000), (3000, 40)), ((3, 1, 9000), (9000, 2))])
def test_he_matmul_is_exact_mod_2_to_the_l(x_shape, w_shape) -> None:  # type: ignore[no-untyped-def]
    got, want, _ = _secure("matmul", None, x_shape, w_shape, wb=12)
    assert got.shape == want.shape and np.array_equal(got, want)


def _spec_t(k, stride, pads, dil=None, groups=1, op=()) -> ConvSpec:  # type: ignore[no-untyped-def]
    return ConvSpec(tuple(k), tuple(stride), tuple(pads), tuple(dil or (1,) * len(k)), groups, tuple(op))


@pytest.mark.parametrize(
    ("kind", "x_shape", "w_shape", "spec"),
    [
        ("conv_transpose", (1, 4, 5, 6), (4, 3, 3, 3), _spec_t((3, 3), (2, 2), (1, 1, 1, 1), op=(1, 0))),
        ("conv_transpose", (2, 4, 4, 4), (4, 2, 2, 2), _spec_t((2, 2), (2, 2), (0, 0, 0, 0), groups=2)),  # U-Net up
        ("conv_transpose", (1, 2, 7), (2, 3, 3), _spec_t((3,), (2,), (2, 0), dil=(2,))),  # 1-D, dilated
        ("conv", (2, 3, 17), (5, 3, 4), _spec_t((4,), (3,), (1, 2))),  # 1-D
        ("channel_scale", (2, 6, 5, 4), (6,), None),
        ("channel_scale", (3, 7), (7,), None),
    ],
)
def test_he_other_layer_kinds_are_exact_mod_2_to_the_l(kind, x_shape, w_shape, spec) -> None:  # type: ignore[no-untyped-def]
    got, want, _ = _secure(kind, spec, x_shape, w_shape)
    assert got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize(
    ("kind", "x_shape", "w_shape", "spec"),
    [
        ("conv", (1, 2, 6, 6, 6), (4, 2, 3, 3, 3), _spec_t((3, 3, 3), (1, 1, 1), (1,) * 6)),
        # stride, asymmetric pads, dilation, groups, batch 2 (space-to-depth in 3-D)
        ("conv", (2, 4, 7, 8, 9), (6, 2, 3, 3, 2), _spec_t((3, 3, 2), (2, 1, 2), (1, 0, 1, 1, 1, 0), dil=(1, 2, 1), groups=2)),
        ("conv", (1, 3, 11, 10, 9), (2, 3, 3, 2, 3), _spec_t((3, 2, 3), (3, 2, 1), (0, 1, 2, 1, 0, 0), dil=(2, 1, 1))),  # stride 3
        ("conv", (1, 40, 12, 12, 12), (3, 40, 1, 1, 1), _spec_t((1, 1, 1), (1, 1, 1), (0,) * 6)),  # several channel blocks
        ("conv", (1, 1, 30, 30, 30), (2, 1, 3, 3, 3), _spec_t((3, 3, 3), (1, 1, 1), (1,) * 6)),  # several spatial tiles
        ("conv", (2, 3, 5, 5, 5), (3, 1, 3, 3, 3), _spec_t((3, 3, 3), (1, 1, 1), (1,) * 6, groups=3)),  # depthwise
        ("conv_transpose", (1, 4, 3, 4, 5), (4, 3, 2, 2, 2), _spec_t((2, 2, 2), (2, 2, 2), (0,) * 6)),  # U-Net up
        ("conv_transpose", (2, 4, 3, 3, 4), (4, 1, 3, 3, 3), _spec_t((3, 3, 3), (2, 2, 1), (1, 1, 1, 1, 0, 1), groups=2, op=(1, 0, 0))),
        ("conv_transpose", (1, 2, 4, 3, 3), (2, 2, 2, 3, 2), _spec_t((2, 3, 2), (1, 2, 3), (0, 2, 0, 1, 0, 0), dil=(2, 1, 1))),
        # large enough for the polyphase (sub-pixel) lowering: no zero-upsampled input
        ("conv_transpose", (2, 16, 8, 8, 8), (16, 1, 3, 3, 3), _spec_t((3, 3, 3), (2, 2, 2), (1,) * 6, groups=2, op=(1, 1, 1))),
        ("conv_transpose", (1, 16, 8, 9, 8), (16, 3, 3, 2, 3), _spec_t((3, 2, 3), (2, 2, 3), (1, 0, 2, 0, 1, 1), dil=(1, 2, 1), op=(1, 0, 2))),
        ("channel_scale", (2, 3, 4, 5, 6), (3,), None),
    ],
)
def test_he_3d_layers_are_exact_mod_2_to_the_l(kind, x_shape, w_shape, spec) -> None:  # type: ignore[no-untyped-def]
    # Execute
    got, want, _ = _secure(kind, spec, x_shape, w_shape)

    # Assert
    assert got.shape == want.shape and np.array_equal(got, want)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "spec"),
    [
        ((1, 256, 4, 4), (64, 256, 1, 1), _spec((1, 1))),  # DenseNet-121's late 1x1 convs, small
        ((1, 64, 4, 4), (16, 64, 3, 3), _spec((3, 3), pads=(1, 1, 1, 1))),  # and its 3x3 ones
        ((2, 4, 30, 30), (10, 2, 3, 3), _spec((3, 3), pads=(1, 1, 1, 1), groups=2)),  # groups, batch, 5 channels in 3 + 2
    ],
)
def test_small_convs_put_several_output_channels_in_one_reply(x_shape, w_shape, spec) -> None:  # type: ignore[no-untyped-def]
    # Prepare: the tiling batches outputs (Mw channels spaced Cw x volume apart, Mw Cw volume <= N)
    g = geometry("conv", spec, x_shape, w_shape, 8192)
    t = g.tiling
    assert t is not None and t.mw > 1 and t.mw * t.cw * t.volume <= 8192
    assert len(set(g.targets().tolist())) == t.mw * np.prod(t.out) and g.targets().max() < 8192
    assert g.output_polys() < x_shape[0] * w_shape[0] * t.n_tiles

    # Execute
    got, want, (_, ch1) = _secure("conv", spec, x_shape, w_shape)

    # Assert: exact, and the model owner sent the batched replies only
    assert np.array_equal(got, want)
    assert ch1.counters.bytes_sent == g.output_polys() * 2 * (8192 + len(g.targets())) * 8 + 136


def test_3d_packing_puts_c_d_h_w_blocks_in_one_polynomial() -> None:
    # 1 -> 16 channels, 3x3x3, pad 1, on 32^3 (a MONAI 3-D U-Net's first layer): whole
    # (depth-slab x H x W) tiles of the padded volume, overlapping by kd - 1 = 2 slices
    g = geometry("conv", _spec_t((3, 3, 3), (1, 1, 1), (1,) * 6), (1, 1, 32, 32, 32), (16, 1, 3, 3, 3), 8192)
    t = g.tiling
    assert t is not None and t.cw * t.volume <= 8192 and t.k == (3, 3, 3)
    assert len(g.targets()) == np.prod(t.out) and g.targets().max() < 8192
    assert np.prod([t.tiles[d] * t.out[d] for d in range(3)]) >= 32**3
    assert g.input_polys() == t.n_tiles and g.output_polys() == 16 * t.n_tiles


@pytest.mark.parametrize(
    ("kind", "x_shape", "w_shape", "spec"),
    [
        ("conv", (1, 3, 40, 40, 40), (2, 3, 1, 1, 1), _spec_t((1, 1, 1), (2, 2, 2), (0,) * 6)),  # 7 of 8 phases: no taps
        ("conv", (1, 2, 6, 6, 6), (3, 2, 3, 3, 3), _spec_t((3, 3, 3), (1, 1, 1), (1,) * 6)),  # output channel 0 all zero
    ],
)
def test_all_zero_kernel_blocks_give_exact_zeros(kind, x_shape, w_shape, spec) -> None:  # type: ignore[no-untyped-def]
    # SEAL refuses a product by the zero polynomial; such blocks are left out of the sum
    got, want, _ = _secure(kind, spec, x_shape, w_shape, zero_out=0 if w_shape[0] == 3 else None)
    assert np.array_equal(got, want)


def test_large_3d_conv_transpose_is_lowered_without_upsampling() -> None:
    # a U-Net's way up, 32 x 16^3 -> 16 x 32^3: one stride-1 conv of x itself with 8 phases
    # as output channels (2x2x2 taps), about half the bytes of the zero-upsampled form
    from privmed.mpc.twoparty.he_layers import _transpose, _wire_bytes, lower

    spec = _spec_t((3, 3, 3), (2, 2, 2), (1,) * 6, op=(1, 1, 1))
    low = lower("conv_transpose", spec, (1, 32, 16, 16, 16), (32, 16, 3, 3, 3))
    assert low.x_shape == (1, 32, 17, 17, 17) and low.w_shape == (128, 32, 2, 2, 2)
    upsampled = _transpose(spec, (1, 32, 16, 16, 16), (32, 16, 3, 3, 3), lambda y: y)
    assert _wire_bytes(low, 8192) < 0.6 * _wire_bytes(upsampled, 8192)
    # small ones keep the upsampled form where it is cheaper (fewer reply ciphertexts)
    assert lower("conv_transpose", spec, (1, 8, 4, 4, 4), (8, 4, 3, 3, 3)).x_shape == (1, 8, 7, 7, 7)


def test_3d_tilings_keep_the_flooding_room_of_the_widest_ring() -> None:
    # 128 channels of 18^3 fill a polynomial each: the cheapest tiling would sum 128 blocks per
    # reply, past what flooding allows at l = 43 with 17-bit weights; the cap keeps 64
    from privmed.mpc.twoparty.he_encoding import MAX_BLOCKS_3D

    g = geometry("conv", _spec_t((3, 3, 3), (1, 1, 1), (1,) * 6), (1, 128, 16, 16, 16), (128, 128, 3, 3, 3), 8192)
    assert g.tiling is not None and g.tiling.n_cb <= MAX_BLOCKS_3D
    assert flood_bits(HEParams(plain_bits=43), 17, g.tiling.n_cb) > 0
    with pytest.raises(ValueError, match="flooding needs"):
        flood_bits(HEParams(plain_bits=43), 17, 128)


def test_4d_kernels_are_refused_by_name() -> None:
    with pytest.raises(RuntimeError, match="HE linear layer for kind 'conv' \\(4-d\\) is not implemented"):
        _secure("conv", _spec_t((1, 1, 1, 1), (1, 1, 1, 1), (0,) * 8), (1, 1, 2, 2, 2, 2), (1, 1, 1, 1, 1, 1))


def test_he_offline_mask_correlation_and_a_wider_ring() -> None:
    # the offline use: the data owner encrypts a random mask A; shares of L(W, A) mod 2^44
    got, want, (ch0, ch1) = _secure("conv", _spec((3, 3), pads=(1, 1, 1, 1)), (1, 8, 6, 6), (2, 8, 3, 3), bits=44, mask_only=True)
    assert np.array_equal(got, want)
    g = geometry("conv", _spec((3, 3), pads=(1, 1, 1, 1)), (1, 8, 6, 6), (2, 8, 3, 3), 8192)
    n, frame = 8192, 136
    # data owner: public key, then the lengths and seeded ciphertexts (about half of 48 N each)
    upload = ch0.counters.bytes_sent - (2 * 4 * n * 8 + frame) - (8 * g.input_polys() + 2 * frame)
    assert 0.4 * 48 * n * g.input_polys() < upload < 0.55 * 48 * n * g.input_polys()
    # model owner: c1 and the result coefficients of c0, 2 primes each
    assert ch1.counters.bytes_sent == g.output_polys() * 2 * (n + len(g.targets())) * 8 + frame


def test_flooding_budget_is_checked_not_assumed() -> None:
    assert flood_bits(HEParams(plain_bits=37), 16, 64) + 2 <= 109 - 37
    with pytest.raises(ValueError, match="flooding needs"):
        flood_bits(HEParams(plain_bits=56), 16, 64)


def test_weights_outside_the_declared_width_are_refused_and_the_peer_stops() -> None:
    # Prepare
    w = np.full((4, 2), 300, dtype=np.int64)  # 300 >= 2^8
    params = HEParams()

    def data_owner(ch):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(params), ch, True)
        return he_linear(he, ch, "L1", "matmul", None, (1, 4), (4, 2), x=np.zeros((1, 4), U64))

    def model_owner(ch):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(params), ch, False)
        return he_linear(he, ch, "L1", "matmul", None, (1, 4), (4, 2), weight=w, weight_bits=8, stream=PRG.fresh().stream("he"))

    # Execute / Assert: the model owner names the bound, the data owner sees the lost peer
    with pytest.raises(RuntimeError, match=r"(?s)data-owner:.*lost connection to model-owner.*expected weights with \|w\| < 2\^8"):
        run_two(data_owner, model_owner, timeout_s=10)


def test_replies_carry_the_flooding_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: record the reply ciphertexts (2 primes) the data owner loads
    replies: list = []
    original = SealIO.ciphertext

    def spy(self, data, parms_id, ntt=False):  # type: ignore[no-untyped-def]
        ct = original(self, data, parms_id, ntt)
        if data.shape[1] == 2:
            replies.append(ct)
        return ct

    monkeypatch.setattr(SealIO, "ciphertext", spy)
    params, w_shape, x_shape = HEParams(), (1, 8192), (1, 1)  # every coefficient is a result: c0 whole
    w = np.ones(w_shape, dtype=np.int64)

    def data_owner(ch):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(params), ch, True)
        he_linear(he, ch, "L1", "matmul", None, x_shape, w_shape, x=np.ones(x_shape, U64))
        return he

    def model_owner(ch):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(params), ch, False)
        return he_linear(he, ch, "L1", "matmul", None, x_shape, w_shape, weight=w, weight_bits=8, stream=PRG.fresh().stream("he"))

    # Execute
    he, _, _ = run_two(data_owner, model_owner)

    # Assert: SEAL's noise budget log2(Delta / noise) is what flooding leaves (about
    # reply_bits - l - F), far below the ~68 bits an unflooded reply would have, and still > 0
    flood = flood_bits(params, 8, 1)
    budgets = [he.decryptor.invariant_noise_budget(ct) for ct in replies]
    assert budgets and all(0 < b <= params.reply_bits - params.plain_bits - flood + 2 for b in budgets)


def test_offline_he_on_a_mask_then_one_online_message_gives_the_layer() -> None:
    # Prepare
    rng = np.random.default_rng(5)
    bits, kind, spec = 37, "conv", _spec((3, 3), pads=(1, 1, 1, 1))
    x_shape, w_shape = (1, 3, 6, 6), (4, 3, 3, 3)
    ring = U64((1 << bits) - 1)
    x = rng.integers(0, 1 << bits, x_shape, dtype=U64)
    x0 = rng.integers(0, 1 << bits, x_shape, dtype=U64)
    x1 = (x - x0) & ring
    w = rng.integers(-100, 100, w_shape, dtype=np.int64)
    mask = PRG.fresh().stream("A").uint64(x_shape) & ring
    params = HEParams(plain_bits=bits)

    def data_owner(ch):  # type: ignore[no-untyped-def]
        c0 = he_linear(he_setup(SealIO(params), ch, True), ch, "L1", kind, spec, x_shape, w_shape, x=mask)  # offline
        return online_linear(ch, "L1", True, kind, spec, x0, c0, bits, mask=mask)

    def model_owner(ch):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(params), ch, False)
        c1 = he_linear(he, ch, "L1", kind, spec, x_shape, w_shape, weight=w, weight_bits=8, stream=PRG.fresh().stream("m"))
        return online_linear(ch, "L1", False, kind, spec, x1, c1, bits, weight=w)

    # Execute
    y0, y1, _ = run_two(data_owner, model_owner)

    # Assert
    assert np.array_equal((y0 + y1) & ring, linear(kind, spec, w.view(U64), x) & ring)


def test_z2_64_shares_through_an_he_layer_and_back_by_extension() -> None:
    # Prepare: Z_2^64 shares of a small activation; |L(W, x)| < 2^35 fits the 37-bit HE ring
    rng = np.random.default_rng(11)
    bits, kind, spec = 37, "conv", _spec((3, 3), pads=(1, 1, 1, 1))
    x_shape, w_shape = (1, 4, 6, 6), (3, 4, 3, 3)
    x = rng.integers(-(1 << 16), 1 << 16, x_shape, dtype=np.int64).view(U64)
    w = rng.integers(-(1 << 8), 1 << 8, w_shape, dtype=np.int64)
    x0 = rng.integers(0, 2**64 - 1, x_shape, dtype=U64, endpoint=True)
    x1 = x - x0
    params = HEParams(plain_bits=bits)

    def data_owner(ch):  # type: ignore[no-untyped-def]
        y = he_linear(he_setup(SealIO(params), ch, True), ch, "L1", kind, spec, x_shape, w_shape, x=x0)  # x0 mod 2^37
        return compare.extend(ot_setup(ch, "s", PRG.fresh(), True), "L1", True, y.reshape(-1), bits, 64)

    def model_owner(ch):  # type: ignore[no-untyped-def]
        he = he_setup(SealIO(params), ch, False)
        y = he_linear(he, ch, "L1", kind, spec, x_shape, w_shape, x=x1, weight=w, weight_bits=9, stream=PRG.fresh().stream("m"))
        return compare.extend(ot_setup(ch, "s", PRG.fresh(), False), "L1", False, y.reshape(-1), bits, 64)

    # Execute
    y0, y1, _ = run_two(data_owner, model_owner)

    # Assert: the Z_2^64 result of the layer, exactly
    assert np.array_equal((y0 + y1).reshape(-1), linear(kind, spec, w.view(U64), x).reshape(-1))


@pytest.mark.slow
def test_a_realistic_layer_is_exact_and_its_traffic_is_as_documented() -> None:
    # the docs' measured layer: 56x56x128 -> 32 channels, 3x3, pad 1 (a few seconds)
    got, want, (ch0, ch1) = _secure("conv", _spec((3, 3), pads=(1, 1, 1, 1)), (1, 128, 56, 56), (32, 128, 3, 3), wb=12)
    assert np.array_equal(got, want)
    assert ch0.counters.bytes_sent < 13.2e6 and ch1.counters.bytes_sent < 6.0e6
