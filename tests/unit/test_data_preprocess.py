"""Preprocess: resize against skimage, JSON round trip, layouts, normalisations, load_for_model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from privmed.data.preprocess import Preprocess, load_for_model, resize, sidecar_path
from privmed.data.synth import synth_chest_study
from privmed.errors import InputError


@pytest.mark.parametrize(
    ("shape", "out"),
    [
        ((64, 64), (32, 32)),
        ((64, 48), (100, 30)),
        ((37, 53), (224, 224)),
        ((10, 20, 30), (7, 25, 16)),
    ],
)
def test_resize_matches_skimage(shape: tuple[int, ...], out: tuple[int, ...]) -> None:
    from skimage.transform import resize as sk_resize

    image = np.random.default_rng(0).random(shape)
    expected = sk_resize(image, out, order=1, mode="edge", anti_aliasing=True)
    # same sampling grid and anti-aliasing sigma: agreement to float64 rounding
    np.testing.assert_allclose(resize(image, out), expected, atol=1e-12)


def test_json_round_trip_and_validation(tmp_path: Path) -> None:
    pre = Preprocess(size=(32, 48), channels=3, normalize="fixed", mean=0.4, std=0.2,
                     window=(40, 400), modalities=["cr", "DX"])  # fmt: skip
    path = pre.save(tmp_path / "m.preprocess.json")

    back = Preprocess.load(path)

    assert back == pre and back.modalities == ["CR", "DX"] and back.window == (40.0, 400.0)
    assert sidecar_path("models/clf.onnx") == Path("models/clf.preprocess.json")
    with pytest.raises(InputError, match="expected version 1"):
        Preprocess.from_json(pre.to_json().replace('"version": 1', '"version": 9'))
    with pytest.raises(InputError, match=r"unknown keys \['colour'\]"):
        Preprocess.from_json(pre.to_json().replace('"channels"', '"colour": 1, "channels"'))
    with pytest.raises(InputError, match="channels: expected 1 or 3, got 2"):
        Preprocess(channels=2)
    with pytest.raises(InputError, match="normalize"):
        Preprocess(normalize="l2")


def test_apply_layouts_channels_and_normalisations() -> None:
    rng = np.random.default_rng(1)
    gray = rng.random((20, 30))
    rgb = rng.random((20, 30, 3))

    out_gray = Preprocess(size=(10, 15), channels=3, normalize="none").apply(gray)
    out_rgb = Preprocess(channels=1, normalize="none").apply(rgb)
    out_cf = Preprocess(channels=1, normalize="none").apply(np.moveaxis(rgb, -1, 0))
    z = Preprocess(normalize="zscore").apply(gray)
    mm = Preprocess(normalize="minmax").apply(gray)
    fixed = Preprocess(normalize="fixed", mean=0.5, std=0.25).apply(gray)
    win = Preprocess(window=(0.5, 0.5), normalize="none").apply(gray)

    assert out_gray.shape == (3, 10, 15) and out_gray.dtype == np.float32
    np.testing.assert_array_equal(out_gray[0], out_gray[2])
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    np.testing.assert_allclose(out_rgb[0], luma, atol=1e-6)
    np.testing.assert_allclose(out_cf, out_rgb, atol=1e-6)
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1.0, abs=1e-5)
    assert mm.min() == 0.0 and mm.max() == 1.0
    np.testing.assert_allclose(fixed[0], (gray - 0.5) / 0.25, atol=1e-6)
    np.testing.assert_allclose(win[0], np.clip((gray - 0.25) / 0.5, 0, 1), atol=1e-6)
    with pytest.raises(InputError, match=r"expected an image of shape .*got \(4, 5, 6, 7\)"):
        Preprocess().apply(np.zeros((4, 5, 6, 7)))


def test_apply_3d_volume() -> None:
    vol = np.random.default_rng(2).random((12, 16, 20))
    out = Preprocess(size=(6, 8, 10), normalize="none").apply(vol)
    assert out.shape == (1, 6, 8, 10)
    np.testing.assert_allclose(out[0], resize(vol, (6, 8, 10)), atol=1e-6)


def test_png_and_dicom_give_the_same_model_input(tmp_path: Path) -> None:
    """The same phantom stored as PNG and as DICOM (incl. MONOCHROME1 with rescale) preprocesses
    to the same tensor up to 8-bit PNG quantisation (1/255 before min-max scaling)."""
    png = synth_chest_study(tmp_path / "png", sites=2, n_per_site=1, size=32, fmt="png", seed=0)
    dcm = synth_chest_study(tmp_path / "dcm", sites=2, n_per_site=1, size=32, fmt="dicom", seed=0)
    pre = Preprocess(size=(24, 24), channels=3, normalize="minmax", window="file")
    for name in ("00000001_000", "00100001_000"):  # site_a MONOCHROME2, site_b MONOCHROME1
        a = load_for_model(png / "images" / f"{name}.png", pre)
        b = load_for_model(dcm / "images" / f"{name}.dcm", pre)
        assert a.shape == b.shape == (1, 3, 24, 24) and a.dtype == np.float32
        np.testing.assert_allclose(a, b, atol=0.02)


def test_load_for_model_errors(tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    ct = get_testdata_file("CT_small.dcm", download=False)
    x = load_for_model(ct, Preprocess(size=(64, 64), window=(40, 400), modalities=["CT"]))
    assert x.shape == (1, 1, 64, 64) and 0.0 <= x.min() and x.max() <= 1.0
    with pytest.raises(InputError, match="expected modality CR or DX, got CT"):
        load_for_model(ct, Preprocess(modalities=["CR", "DX"]))
    np.save(tmp_path / "vol.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(InputError, match=r"vol\.npy: expected an image of shape"):
        load_for_model(tmp_path / "vol.npy", Preprocess())
