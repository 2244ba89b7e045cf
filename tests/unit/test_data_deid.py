"""`privmed data deid`: a seeded CT series and a radiograph de-identified; no seed left, images intact.

The oracle for "intact" is the reader: the same voxels, the same geometry, one series still.
The oracle for "de-identified" is a byte search of every output file for every seeded value
(names in PN attributes, IDs, birth date, free text, a private tag, the file names).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from privmed.cli.main import main
from privmed.data.deid import deidentify_folder
from privmed.data.dicom_make import Identity, write_ct_series
from privmed.data.readers import read_dicom_series, read_image

KEY = bytes(range(32))
SECRETS = ["WOLFGANG", "AMADEUS", "PID31415", "17560127", "ACC271828", "Salzburg", "Dr^Leopold", "Kapellmeister"]


def seeded_folder(root: Path) -> Path:
    src = root / "export" / "WOLFGANG_AMADEUS_PID31415"  # folder and file names identify too
    files = write_ct_series(src, np.arange(3 * 16 * 16, dtype=np.int16).reshape(3, 16, 16) - 500, (2.0, 0.7, 0.7),
                            Identity(patient_name="WOLFGANG^AMADEUS", patient_id="PID31415",
                                     birth_date="17560127", accession="ACC271828"))  # fmt: skip
    for f in files:
        ds = pydicom.dcmread(f)
        ds.ReferringPhysicianName = "Dr^Leopold"
        ds.InstitutionName = "Salzburg"
        ds.ImageComments = "WOLFGANG AMADEUS, Kapellmeister"
        block = ds.private_block(0x0011, "PRIVMED TEST", create=True)
        block.add_new(0x01, "LO", "PID31415 WOLFGANG")
        ds.save_as(f)
    return src


def test_deid_removes_every_seeded_identifier_and_keeps_the_images(tmp_path: Path) -> None:
    # Prepare
    src = seeded_folder(tmp_path)
    before, meta_before = read_dicom_series(src)
    # Execute
    summary = deidentify_folder(src, tmp_path / "shared", KEY)
    again = deidentify_folder(src, tmp_path / "again", KEY)
    # Assert: no seeded value in any output byte or name
    assert len(summary.written) == 3 and not summary.refused
    for f in summary.written:
        data = f.read_bytes()
        for secret in SECRETS:
            assert secret.encode() not in data and secret.upper().encode() not in data, (secret, f.name)
        ds = pydicom.dcmread(f)
        assert ds.PatientIdentityRemoved == "YES"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
        assert not any(elem.tag.is_private for elem in ds)
    # Assert: the same voxels and geometry, still one series; UIDs mapped the same way twice
    after, meta_after = read_dicom_series(tmp_path / "shared")
    np.testing.assert_array_equal(after, before)
    np.testing.assert_allclose(meta_after["spacing"], meta_before["spacing"])
    assert meta_after["series_uid"] != meta_before["series_uid"]
    assert sorted(p.name for p in summary.written) == sorted(p.name for p in again.written)


def test_burned_in_annotation_is_refused_and_the_cli_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pydicom.data import get_testdata_file

    src = tmp_path / "src"
    src.mkdir()
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(src / "ok.dcm")
    ds.BurnedInAnnotation = "YES"
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".1"
    ds.save_as(src / "burned.dcm")
    code = main(["data", "deid", str(src), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 1
    assert f"refused {src / 'burned.dcm'}: BurnedInAnnotation YES: the pixels may show identifying text" in err
    assert "de-identified 1 DICOM files into" in out and "(1 refused, 0 non-DICOM files skipped)" in out
    image, _ = read_image(next((tmp_path / "out").iterdir()))
    np.testing.assert_array_equal(image, read_image(src / "ok.dcm")[0])
