"""Readers on files made here (DICOM incl. MONOCHROME1 and rescale, PNG, NPY, NIfTI) and on
pydicom's bundled samples, against pydicom / Pillow / nibabel as oracles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
from PIL import Image  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.pixels import apply_modality_lut  # noqa: E402

from privmed.data.readers import apply_window, read_dicom_series, read_image, write_nifti  # noqa: E402
from privmed.data.synth import site_styles  # noqa: E402
from privmed.data.writers import write_chest_dicom  # noqa: E402
from privmed.errors import InputError  # noqa: E402

# Only files that ship inside the pydicom wheel (others would be downloaded).
CT_SMALL = get_testdata_file("CT_small.dcm", download=False)
MR_SMALL = get_testdata_file("MR_small.dcm", download=False)
RTPLAN = get_testdata_file("rtplan.dcm", download=False)


def _ramp(h: int = 16, w: int = 20) -> np.ndarray:
    return (np.arange(h * w, dtype=np.float64).reshape(h, w) / (h * w - 1)).astype(np.float32)


def test_ct_small_hu_match_pydicom_modality_lut() -> None:
    ds = pydicom.dcmread(CT_SMALL)
    expected = apply_modality_lut(ds.pixel_array, ds)

    hu, meta = read_image(CT_SMALL)

    np.testing.assert_array_equal(hu, expected.astype(np.float32))  # exact: integers * 1 - 1024
    assert meta["modality"] == "CT" and meta["rescale"] == (1.0, -1024.0)
    assert meta["spacing"] == pytest.approx((0.661468, 0.661468))
    # affine maps pixel (row 0, col 0) to ImagePositionPatient, in RAS (x, y negated)
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    np.testing.assert_allclose(meta["affine"][:3, 3], ipp * [-1, -1, 1])


def test_ct_small_given_window() -> None:
    hu, _ = read_image(CT_SMALL)
    out, _ = read_image(CT_SMALL, window=(40.0, 400.0))
    np.testing.assert_allclose(out, np.clip((hu - (40 - 200)) / 400, 0, 1), atol=1e-6)


def test_mr_small_file_window() -> None:
    ds = pydicom.dcmread(MR_SMALL)
    raw = ds.pixel_array.astype(np.float64)
    centre, width = float(ds.WindowCenter), float(ds.WindowWidth)

    out, meta = read_image(MR_SMALL, window="file")

    np.testing.assert_allclose(out, np.clip((raw - (centre - width / 2)) / width, 0, 1), atol=1e-6)
    assert meta["modality"] == "MR"


@pytest.mark.parametrize(
    "site_index", [0, 1, 2]
)  # MONOCHROME2 slope 1; MONOCHROME1 slope 2; slope 0.5
def test_dicom_rescale_and_monochrome1_round_trip(tmp_path: Path, site_index: int) -> None:
    site = site_styles(3)[site_index]
    img = _ramp()
    path = write_chest_dicom(tmp_path / "x.dcm", img, site, patient_id="1", uid_entropy=["t"])
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == ("MONOCHROME1" if site.monochrome1 else "MONOCHROME2")

    windowed, _ = read_image(path, window="file")
    raw, meta = read_image(path)

    np.testing.assert_allclose(windowed, img, atol=0.5 / 4000 + 1e-6)  # 12-bit quantisation
    # without a window: modality values, inverted for MONOCHROME1, window moved with them
    modality = apply_modality_lut(ds.pixel_array, ds)
    if site.monochrome1:
        slope, intercept = site.rescale
        lo, hi = intercept, slope * 4095 + intercept
        np.testing.assert_allclose(raw, lo + hi - modality, atol=1e-3)
    else:
        np.testing.assert_allclose(raw, modality, atol=1e-3)
    np.testing.assert_allclose(apply_window(raw, meta["window"]), windowed, atol=1e-6)
    assert meta["modality"] == "CR"


def test_png_8_and_16_bit_and_rgb(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    g8 = rng.integers(0, 256, (12, 9), dtype=np.uint8)
    g16 = rng.integers(0, 65536, (12, 9), dtype=np.uint16)
    rgb = rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb).save(tmp_path / "rgb.jpg", quality=95)

    a8, m8 = read_image(tmp_path / "g8.png")
    a16, _ = read_image(tmp_path / "g16.png")
    argb, mrgb = read_image(tmp_path / "rgb.png")
    ajpg, _ = read_image(tmp_path / "rgb.jpg")

    np.testing.assert_array_equal(a8, g8.astype(np.float32) / 255)
    np.testing.assert_allclose(a16, g16 / 65535.0, atol=1e-7)
    np.testing.assert_array_equal(argb, rgb.astype(np.float32) / 255)
    assert m8["channels"] == 1 and mrgb["channels"] == 3 and argb.shape == (12, 9, 3)
    with Image.open(tmp_path / "rgb.jpg") as im:  # lossy: compare with Pillow's own decoding
        np.testing.assert_array_equal(ajpg, np.asarray(im).astype(np.float32) / 255)


def test_png_with_alpha_is_refused(tmp_path: Path) -> None:
    Image.fromarray(np.zeros((4, 4, 4), dtype=np.uint8), mode="RGBA").save(tmp_path / "x.png")
    with pytest.raises(
        InputError, match=r"x\.png: expected a grayscale or RGB image, got 4 channels"
    ):
        read_image(tmp_path / "x.png")


def test_npy(tmp_path: Path) -> None:
    arr = np.random.default_rng(1).normal(size=(3, 5, 7))
    np.save(tmp_path / "a.npy", arr)
    out, meta = read_image(tmp_path / "a.npy")
    np.testing.assert_array_equal(out, arr.astype(np.float32))
    assert meta["format"] == "npy"


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_affine(tmp_path: Path, suffix: str) -> None:
    rng = np.random.default_rng(2)
    vol = rng.normal(size=(6, 7, 8)).astype(np.float32)
    affine = np.array([[0, 0, -0.8, 10], [0, -0.7, 0, -5], [2.5, 0, 0, 30], [0, 0, 0, 1.0]])
    path = write_nifti(tmp_path / f"v{suffix}", vol, affine)

    out, meta = read_image(path)

    np.testing.assert_array_equal(out, vol)
    np.testing.assert_allclose(meta["affine"], affine)
    np.testing.assert_allclose(meta["spacing"], (2.5, 0.7, 0.8), rtol=1e-6)
    oracle = nib.load(str(path))
    np.testing.assert_allclose(oracle.affine, affine)
    assert int(oracle.header["sform_code"]) == 1


def test_nifti_integer_mask_stored_as_uint8(tmp_path: Path) -> None:
    mask = np.zeros((4, 4, 4), dtype=np.int64)
    mask[1, 2, 3] = 2
    path = write_nifti(tmp_path / "m.nii.gz", mask, np.eye(4))
    assert nib.load(str(path)).get_data_dtype() == np.uint8
    np.testing.assert_array_equal(read_image(path)[0], mask)


def _ct_slice(path: Path, z: float, value: int, series_uid: str) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = f"1.2.3.{int(z * 10) + 1000}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "CT"
    ds.Rows, ds.Columns = 4, 5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.PixelSpacing = ["0.5", "0.6"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.ImagePositionPatient = ["-10", "-20", f"{z}"]
    ds.InstanceNumber = 1  # deliberately uninformative: sorting must use positions
    ds.PixelData = np.full((4, 5), value, dtype="<i2").tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_series_sorted_by_position(tmp_path: Path) -> None:
    zs = [7.5, -2.5, 2.5, 12.5]  # written out of order, names unrelated to position
    for i, z in enumerate(zs):
        _ct_slice(tmp_path / f"s{i}.dcm", z, value=int(1024 + z * 10), series_uid="1.2.3.4")
    (tmp_path / "notes.txt").write_text("not dicom")

    vol, meta = read_dicom_series(tmp_path)

    np.testing.assert_array_equal(vol[:, 0, 0], [z * 10 for z in sorted(zs)])  # HU = stored - 1024
    assert meta["spacing"] == pytest.approx((5.0, 0.5, 0.6))
    # voxel (k, r, c) -> RAS: x = -(-10 + 0.6 c), y = -(-20 + 0.5 r), z = -2.5 + 5 k
    np.testing.assert_allclose(meta["affine"] @ [2, 3, 4, 1], [10 - 2.4, 20 - 1.5, 7.5, 1])


def test_dicom_series_refuses_two_series_naming_them_and_reads_the_one_chosen(tmp_path: Path) -> None:
    _ct_slice(tmp_path / "a.dcm", 0.0, 1024, "1.2.3.4")
    _ct_slice(tmp_path / "b.dcm", 5.0, 1024, "1.2.3.5")
    with pytest.raises(InputError, match=r"2 series in this folder, choose one with --series UID: 1\.2\.3\.4 \(CT, 1 image\); 1\.2\.3\.5"):
        read_dicom_series(tmp_path)
    volume, meta = read_dicom_series(tmp_path, series_uid="1.2.3.5")
    assert volume.shape[0] == 1 and meta["series_uid"] == "1.2.3.5" and meta["files"] == [str(tmp_path / "b.dcm")]
    with pytest.raises(InputError, match=r"no series 9\.9 here; found 1\.2\.3\.4 \(CT, 1 image\)"):
        read_dicom_series(tmp_path, series_uid="9.9")


def test_not_a_dicom_file(tmp_path: Path) -> None:
    (tmp_path / "scan.dcm").write_bytes(b"hello, this is not DICOM" * 10)
    with pytest.raises(InputError, match=r"scan\.dcm: not a DICOM file \(missing preamble\)"):
        read_image(tmp_path / "scan.dcm")


def test_dicom_without_pixels_and_wrong_modality() -> None:
    with pytest.raises(InputError, match="rtplan.dcm: DICOM has no pixel data"):
        read_image(RTPLAN)
    with pytest.raises(InputError, match="CT_small.dcm: expected modality CR or DX, got CT"):
        read_image(CT_SMALL, modalities=["CR", "DX"])


def test_unreadable_and_unknown_files(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "x.txt").write_text("hi")
    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(InputError, match=r"broken\.png: not a readable image"):
        read_image(tmp_path / "broken.png")
    with pytest.raises(InputError, match=r"x\.txt: unknown image format"):
        read_image(tmp_path / "x.txt")
    with pytest.raises(InputError, match=r"bad\.npy: not a readable \.npy"):
        read_image(tmp_path / "bad.npy")
    with pytest.raises(InputError, match=r"missing\.png: no such file"):
        read_image(tmp_path / "missing.png")


def test_extensionless_dicom_detected_by_marker(tmp_path: Path) -> None:
    data = Path(CT_SMALL).read_bytes()
    (tmp_path / "IM0001").write_bytes(data)
    a, _ = read_image(tmp_path / "IM0001")
    b, _ = read_image(CT_SMALL)
    np.testing.assert_array_equal(a, b)
