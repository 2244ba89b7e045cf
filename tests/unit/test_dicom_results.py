"""DICOM in and out with real files: RG1 (pydicom-data), the InVesalius head CT, SEG and SR read back.

Oracles: pydicom's own pixel decoding and VOI handling for RG1; the label map written for the
SEG; the probabilities written for the SR; the source series' geometry for the SEG's planes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from privmed.data.dicom_make import INVESALIUS_CRANIUM, Identity, read_invesalius, write_ct_series
from privmed.data.dicom_out import (
    AlgorithmInfo,
    read_seg_labels,
    read_sr_findings,
    write_seg,
    write_sr,
)
from privmed.data.readers import read_dicom_series, read_image
from privmed.errors import InputError

ALGO = AlgorithmInfo(name="unet-test", version="1.2", plan_sha256="ab" * 32)


def rg1(name: str = "RG1_UNCR.dcm") -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    assert path is not None, f"pydicom-data does not ship {name}"
    return Path(path)


def small_ct(tmp_path: Path, identity: Identity | None = None) -> list[Path]:
    """Six 64 x 64 slices of a head CT (the real one when invesalius-examples is installed)."""
    if INVESALIUS_CRANIUM.is_file():
        hu, spacing = read_invesalius()
        vol, spacing = hu[50:56, ::4, ::4], (spacing[0], spacing[1] * 4, spacing[2] * 4)
    else:  # a phantom keeps the SEG checks running where the Debian package is missing
        from privmed.data.synth_ct import ct_phantom

        vol, _ = ct_phantom(np.random.default_rng(3), (6, 64, 64))
        spacing = (1.5, 3.8, 3.8)
    return write_ct_series(tmp_path / "ct", vol, spacing, identity, origin=(-120.0, -130.0, 40.0))


def test_rg1_monochrome1_is_inverted_over_the_stored_range_and_the_window_follows() -> None:
    # Prepare: pydicom's decoding is the oracle; 15 bits stored, MONOCHROME1, window 15000/30000
    ds = pydicom.dcmread(rg1())
    stored = ds.pixel_array.astype(np.float64)
    # Execute
    array, meta = read_image(rg1())
    lossless, _ = read_image(rg1("RG1_J2KR.dcm"))  # JPEG 2000 lossless through pylibjpeg-openjpeg
    # Assert
    assert array.shape == (1955, 1841) and meta["photometric"] == "MONOCHROME1"
    np.testing.assert_array_equal(array, (2**15 - 1) - stored)
    np.testing.assert_array_equal(lossless, array)
    assert meta["window"] == (2**15 - 1 - 15000.0, 30000.0)
    assert meta["spacing"] is None  # the file stores PixelSpacing 0\0: unknown, never zero
    # the lungs (dark on a radiograph, high stored values in MONOCHROME1) come out low
    lung, mediastinum = array[700:900, 400:600].mean(), array[700:900, 850:1000].mean()
    assert lung < mediastinum - 2000, (lung, mediastinum)


def test_invesalius_head_ct_reads_as_hounsfield_units() -> None:
    if not INVESALIUS_CRANIUM.is_file():
        pytest.skip("Debian package invesalius-examples not installed (apt-get install invesalius-examples)")
    hu, spacing = read_invesalius()
    assert hu.shape == (108, 256, 256) and hu.dtype == np.int16
    assert spacing == pytest.approx((1.5, 0.957, 0.957), abs=1e-3)
    assert hu.min() == -1024 and hu.max() > 1500  # air and cortical bone
    assert (hu[54] > 300).mean() > 0.03  # the skull in a mid slice


def test_seg_references_every_slice_keeps_the_geometry_and_reads_back_voxel_for_voxel(tmp_path: Path) -> None:
    # Prepare
    files = small_ct(tmp_path)
    volume, meta = read_dicom_series(files[0].parent)
    sources = [pydicom.dcmread(f) for f in meta["files"]]
    labels = np.zeros(volume.shape, np.uint8)
    labels[(volume > -100) & (volume < 100)] = 1
    labels[volume > 300] = 2
    labels[0] = 0  # a slice without foreground: no frame for it, still read back as zeros
    # Execute
    out = write_seg(tmp_path / "seg.dcm", sources, labels, ["background", "lesion", "bone"], ALGO)
    back, names = read_seg_labels(out, sources)
    seg = pydicom.dcmread(out)
    # Assert
    np.testing.assert_array_equal(back, labels)
    assert names == ["lesion", "bone"]
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID and seg.PatientID == sources[0].PatientID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    referenced = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for i in s.ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in sources}
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "unet-test" and algo.AlgorithmVersion == "1.2"
    assert "ab" * 32 in algo.AlgorithmParameters and "secure multi-party" in algo.AlgorithmParameters
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == 2 * 5  # two segments on the five slices that have foreground
    for frame in frames:  # each frame lies exactly where the slice it was derived from lies
        source_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == [float(v) for v in by_uid[source_uid].ImagePositionPatient]
        assert source_uid != sources[0].SOPInstanceUID
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == [float(v) for v in sources[0].PixelSpacing]


def test_seg_refuses_a_label_map_of_another_shape(tmp_path: Path) -> None:
    files = small_ct(tmp_path)
    sources = [pydicom.dcmread(f) for f in files]
    with pytest.raises(InputError, match=r"seg\.dcm: SEG label slices \(32, 32\) differ from the images' rows x columns \[\(64, 64\)\]"):
        write_seg(tmp_path / "seg.dcm", sources, np.zeros((6, 32, 32), np.uint8), ["background", "lung"], ALGO)


def test_sr_tid1500_holds_one_finding_per_label_referencing_the_radiograph(tmp_path: Path) -> None:
    # Prepare
    source = pydicom.dcmread(rg1(), stop_before_pixels=True)
    probs = [0.02, 0.71, 0.5, 0.4999]
    findings = ["opacity", "nodule", "effusion", "cardiomegaly"]
    # Execute
    out = write_sr(tmp_path / "sr.dcm", source, probs, findings, ALGO, threshold=0.5)
    back = read_sr_findings(out)
    sr = pydicom.dcmread(out)
    # Assert
    assert list(back) == findings
    assert [back[f]["probability"] for f in findings] == pytest.approx(probs, abs=1e-9)
    assert [back[f]["present"] for f in findings] == [False, True, True, False]
    assert {back[f]["source_sop"] for f in findings} == {source.SOPInstanceUID}
    assert {back[f]["algorithm"] for f in findings} == {"unet-test"}
    assert sr.Modality == "SR" and sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_sr_refuses_probabilities_outside_the_unit_interval(tmp_path: Path) -> None:
    source = pydicom.dcmread(rg1(), stop_before_pixels=True)
    with pytest.raises(InputError, match=r"sr\.dcm: SR probabilities must lie in \[0, 1\], got \[1\.5\]"):
        write_sr(tmp_path / "sr.dcm", source, [1.5], ["opacity"], ALGO)


def test_enhanced_multiframe_ct_reads_in_hounsfield_units_and_its_seg_follows_the_file_frames(tmp_path: Path) -> None:
    # Prepare: pydicom's enhanced CT, 2 frames stored in descending position along the normal
    from pydicom.data import get_testdata_file

    from privmed.cli.dicom_results import write_segmentation
    from privmed.segment.volume import read_volume

    path = Path(get_testdata_file("eCT_Supplemental.dcm"))
    source = pydicom.dcmread(path)
    stored = source.pixel_array.astype(np.float64)
    # Execute
    volume = read_volume(path)
    labels = (volume.array > -500).astype(np.uint8)
    out = write_segmentation(tmp_path / "seg.dcm", volume.files, labels, ["background", "tissue"],
                             Path(__file__).parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx", None, secure=True)  # fmt: skip
    back, names = read_seg_labels(out, [source])
    # Assert: rescale from the functional groups (intercept -1024), frames sorted along the normal
    assert volume.kind == "dicom-enhanced" and volume.array.shape == (2, 512, 512)
    np.testing.assert_array_equal(volume.array, (stored - 1024)[::-1])
    assert volume.affine[2, 0] == pytest.approx(-10.0)  # 10 mm slices, RAS z falling
    np.testing.assert_array_equal(back, labels[::-1])  # the SEG's frames are the file's frames
    assert names == ["tissue"]


def test_series_below_a_dicomdir_reads_as_the_folder_did(tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    files = small_ct(tmp_path)
    volume, _ = read_dicom_series(files[0].parent)
    fs = FileSet()
    for f in files:
        fs.add(pydicom.dcmread(f))
    fs.write(tmp_path / "cd")
    assert (tmp_path / "cd" / "DICOMDIR").is_file()
    again, meta = read_dicom_series(tmp_path / "cd")  # the DICOMDIR itself is not an image
    np.testing.assert_array_equal(again, volume)
    assert len(meta["files"]) == 6


def test_view_filter_keeps_only_the_pa_radiograph(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pydicom.data import get_testdata_file

    from privmed.cli.infer import load_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    pa = pydicom.dcmread(rg1())
    pa.save_as(folder / "a_pa.dcm")
    pa.ViewPosition, pa.SOPInstanceUID = "AP", pa.SOPInstanceUID + ".2"
    pa.save_as(folder / "b_ap.dcm")
    pydicom.dcmread(get_testdata_file("CT_small.dcm")).save_as(folder / "c_ct.dcm")
    model = Path(__file__).parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx"
    x, rows = load_inputs([folder], model, None, views=["PA"])
    assert rows == [folder / "a_pa.dcm"] and x.shape == (1, 1, 64, 64)
    assert "2 of 3 inputs skipped: ViewPosition not PA" in capsys.readouterr().err
    with pytest.raises(InputError, match=r"no input has ViewPosition LL \(3 files looked at\)"):
        load_inputs([folder], model, None, views=["LL"])
