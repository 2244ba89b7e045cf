"""From a real PACS and back: Orthanc, a real head CT and a real chest radiograph, secure jobs, SEG and SR.

A locally started Orthanc (``tests/e2e/orthanc.py``: its own network namespace, loopback
only) receives a CT study (six 64 x 64 slices of the InVesalius head CT, or a phantom where
that Debian package is missing) and RG1, pydicom-data's real PA chest radiograph (CR,
MONOCHROME1, 15 bits, 1955 x 1841), both with recognisable patient names and IDs. Then, all
through the CLI inside Orthanc's namespace:

1. ``privmed segment --from-pacs STUDY/SERIES --output seg.dcm --to-pacs``: C-GET, secure
   segmentation (three processes, mutual TLS), DICOM SEG written and C-STOREd;
2. ``privmed infer --from-pacs STUDY --output SR_DIR --to-pacs``: the same for RG1 with the
   shipped classifier, one TID 1500 SR;
3. ``privmed pacs find`` sees the SEG and the SR in their studies (Orthanc indexed them) and
   ``privmed pacs get`` brings them back for highdicom to read.

Oracles: the threshold network of ``tests/unit/test_segment_support`` labels a voxel exactly
when its HU exceeds -500.5 (half a HU between integers, far from any fixed-point error), so
the SEG must equal ``threshold_labels`` voxel for voxel; the SR's probabilities must equal
onnxruntime's on the same preprocessed array to 1e-3 (the demo's tolerance; measured ~5e-5).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

from privmed.data.dicom_make import Identity, write_ct_series
from privmed.data.dicom_out import read_seg_labels, read_sr_findings
from privmed.data.readers import read_dicom_series

from ..unit.test_dicom_results import rg1
from ..unit.test_segment_support import threshold_labels, threshold_model
from .conftest import error_message, onnxruntime_output
from .orthanc import Orthanc, start_orthanc, stop_orthanc

SHIPPED = Path(__file__).parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx"
CT_PATIENT = Identity(patient_name="SEEDED^CTPATIENT", patient_id="CTPID-4711", birth_date="19500101",
                      study_description="HEAD CT", series_description="head 1.5 mm")  # fmt: skip


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        yield server
    finally:
        stop_orthanc(server)


def ok(res, what: str) -> str:  # type: ignore[no-untyped-def]
    assert res.returncode == 0, f"{what} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def find_rows(stdout: str) -> list[dict[str, str]]:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    header = lines[0].split("\t")
    return [dict(zip(header, ln.split("\t"), strict=True)) for ln in lines[1:]]


@pytest.fixture(scope="module")
def stored(orthanc: Orthanc, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The CT series and RG1 stored into Orthanc by `privmed pacs store`."""
    from ..unit.test_dicom_results import small_ct

    root = tmp_path_factory.mktemp("pacs_in")
    ct_files = small_ct(root, CT_PATIENT)
    rg = pydicom.dcmread(rg1())
    rg.PatientName, rg.PatientID = "SEEDED^CRPATIENT", "CRPID-0815"
    rg.save_as(root / "rg1.dcm")
    out = ok(orthanc.run(["pacs", "store", ct_files[0].parent, root / "rg1.dcm", *orthanc.pacs_args]), "pacs store")
    assert f"stored {len(ct_files) + 1} objects into PACS ORTHANC@127.0.0.1:4242" in out
    first = pydicom.dcmread(ct_files[0])
    return {"ct_files": ct_files, "ct_study": first.StudyInstanceUID, "ct_series": first.SeriesInstanceUID,
            "rg": rg, "root": root}  # fmt: skip


def test_study_from_orthanc_segmented_and_classified_securely_seg_and_sr_stored_back_and_read(
    orthanc: Orthanc, stored: dict[str, object], tmp_path: Path
) -> None:
    # Prepare
    model = threshold_model(tmp_path / "head.onnx", 2, 64, labels=["background", "head"])
    ct_study, ct_series, rg = stored["ct_study"], stored["ct_series"], stored["rg"]
    assert isinstance(rg, pydicom.Dataset)
    hu, meta = read_dicom_series(Path(stored["ct_files"][0]).parent)  # type: ignore[index]
    series = ok(orthanc.run(["pacs", "find", "--level", "series", "--modality", "CT", *orthanc.pacs_args]), "find CT")
    assert [(r["StudyInstanceUID"], r["SeriesInstanceUID"]) for r in find_rows(series)] == [(ct_study, ct_series)]
    # Execute: secure segmentation and classification, from the PACS and back
    seg_run = orthanc.run(["segment", "--model", model, "--from-pacs", f"{ct_study}/{ct_series}",
                           "--output", tmp_path / "seg.dcm", "--to-pacs", *orthanc.pacs_args])  # fmt: skip
    sr_run = orthanc.run(["infer", "--model", SHIPPED, "--from-pacs", rg.StudyInstanceUID,
                          "--output", tmp_path / "sr", "--to-pacs", *orthanc.pacs_args])  # fmt: skip
    # Assert: both ran securely and stored their object
    seg_out, sr_out = ok(seg_run, "segment"), ok(sr_run, "infer")
    assert "revealed to the data owner only" in seg_out and "stored 1 object into PACS" in seg_out
    assert re.search(r"retrieved 6 objects \([\d.]+ MB\) from PACS ORTHANC@127\.0\.0\.1:4242 by C-GET", seg_run.stderr)
    assert "known to the data owner only" in sr_out and "stored 1 object into PACS" in sr_out
    # Assert: Orthanc indexed the SEG in the CT study and the SR in the radiograph's study
    found = {}
    for modality, study in (("SEG", ct_study), ("SR", rg.StudyInstanceUID)):
        rows = find_rows(ok(orthanc.run(["pacs", "find", "--level", "series", "--modality", modality,
                                         "--study", study, *orthanc.pacs_args]), f"find {modality}"))  # fmt: skip
        assert len(rows) == 1 and rows[0]["Modality"] == modality, rows
        found[modality] = rows[0]["SeriesInstanceUID"]
    # Assert: retrieved back from Orthanc, highdicom reads the SEG equal to the oracle voxel for voxel
    back = tmp_path / "back"
    ok(orthanc.run(["pacs", "get", "--study", ct_study, "--series", found["SEG"], "--out", back, *orthanc.pacs_args]), "get SEG")
    sources = [pydicom.dcmread(f) for f in meta["files"]]
    labels, names = read_seg_labels(back / found["SEG"] / next((back / found["SEG"]).iterdir()).name, sources)
    np.testing.assert_array_equal(labels, threshold_labels(hu))
    assert names == ["head"] and 0.2 < labels.mean() < 0.9  # the head, not all or nothing
    # Assert: and the SR holds the same probabilities as onnxruntime on the same preprocessed RG1
    ok(orthanc.run(["pacs", "get", "--study", rg.StudyInstanceUID, "--series", found["SR"], "--out", back, *orthanc.pacs_args]), "get SR")
    findings = read_sr_findings(next((back / found["SR"]).iterdir()))
    plain = plaintext_probabilities(stored["root"] / "rg1.dcm")  # type: ignore[operator]
    assert list(findings) == ["opacity", "nodule", "effusion", "cardiomegaly"]
    secure = np.array([findings[k]["probability"] for k in findings])
    np.testing.assert_allclose(secure, plain, atol=1e-3)
    assert {f["source_sop"] for f in findings.values()} == {rg.SOPInstanceUID}
    assert [f["present"] for f in findings.values()] == [bool(p >= 0.5) for p in secure]


def plaintext_probabilities(path: Path) -> np.ndarray:
    """onnxruntime on the shipped model's own preprocessing of the file (MONOCHROME1 inverted)."""
    from privmed.data.preprocess import Preprocess, load_for_model

    pre = Preprocess.from_json(SHIPPED.with_suffix(".preprocess.json").read_text())
    x = np.asarray(load_for_model(path, pre), dtype=np.float32)
    return onnxruntime_output(SHIPPED, x)[0]


def test_pacs_down_wrong_aet_unknown_study_and_two_series_give_one_line_errors(
    orthanc: Orthanc, stored: dict[str, object], tmp_path: Path
) -> None:
    # Prepare: a second CT series in the same study
    ct_files = stored["ct_files"]
    second = write_ct_series(tmp_path / "second", np.full((2, 64, 64), 40, np.int16), (2.0, 1.0, 1.0),
                             Identity(study_uid=str(stored["ct_study"]), series_description="scout"))  # fmt: skip
    ok(orthanc.run(["pacs", "store", second[0].parent, *orthanc.pacs_args]), "store second series")
    model = threshold_model(tmp_path / "head.onnx", 2, 64)
    down = ["--pacs", "127.0.0.1:4299", "--pacs-aet", "ORTHANC", "--pacs-timeout", "5"]
    wrong_aet = tmp_path / "pacs.toml"  # the [pacs] table a session file may carry
    wrong_aet.write_text('[pacs]\nhost = "127.0.0.1"\nport = 4242\naet = "NOT_ORTHANC"\ntimeout = 10\n')
    # Execute
    runs = {
        "down": orthanc.run(["pacs", "echo", *down]),
        "aet": orthanc.run(["pacs", "echo", "--pacs-config", wrong_aet]),
        "study": orthanc.run(["segment", "--model", model, "--from-pacs", "1.2.3.4", "--output", tmp_path / "s.dcm", *orthanc.pacs_args]),
        "two": orthanc.run(["segment", "--model", model, "--from-pacs", str(stored["ct_study"]), "--output", tmp_path / "s.dcm", *orthanc.pacs_args]),
    }  # fmt: skip
    # Assert
    retrieved = re.compile(r"^retrieved \d+ objects .* by C-GET in [\d.]+ s\n", re.M)  # the one progress line
    msg = {k: error_message(retrieved.sub("", r.stderr), k) for k, r in runs.items()}
    assert msg["down"] == "PACS ORTHANC@127.0.0.1:4299: not reachable (Connection refused); is it running and is the port right?"
    assert msg["aet"].startswith("PACS NOT_ORTHANC@127.0.0.1:4242: rejected the association from 'PRIVMED'")
    assert msg["study"].startswith("PACS ORTHANC@127.0.0.1:4242: C-GET of study 1.2.3.4")
    first = pydicom.dcmread(ct_files[0])  # type: ignore[index]
    assert msg["two"].startswith(f"study {stored['ct_study']} from PACS ORTHANC@127.0.0.1:4242: 2 series in this folder, choose one with --series UID: ")
    assert f"{first.SeriesInstanceUID} (CT, 'head 1.5 mm', 6 images)" in msg["two"] and "'scout', 2 images" in msg["two"]


def test_dicomweb_stow_qido_wado_around_a_secure_segmentation(orthanc: Orthanc, tmp_path: Path) -> None:
    # Prepare: a CT series of its own study, stored by STOW-RS
    web = orthanc.dicomweb_args
    files = write_ct_series(tmp_path / "ct", np.rint(np.linspace(-1000, 1000, 3 * 64 * 64)).reshape(3, 64, 64),
                            (2.0, 1.0, 1.0), Identity(patient_name="SEEDED^WEB", patient_id="WEB-1"))  # fmt: skip
    first = pydicom.dcmread(files[0])
    hu, meta = read_dicom_series(files[0].parent)
    model = threshold_model(tmp_path / "m.onnx", 2, 64, labels=["background", "tissue"])
    ok(orthanc.run(["pacs", "store", files[0].parent, *web]), "STOW")
    # Execute: WADO-RS in, secure segmentation, STOW-RS out, QIDO-RS and WADO-RS to check
    run = orthanc.run(["segment", "--model", model, "--from-pacs", f"{first.StudyInstanceUID}/{first.SeriesInstanceUID}",
                       "--output", tmp_path / "seg.dcm", "--to-pacs", *web])  # fmt: skip
    rows = find_rows(ok(orthanc.run(["pacs", "find", "--level", "series", "--study", first.StudyInstanceUID, "--modality", "SEG", *web]), "QIDO"))
    ok(orthanc.run(["pacs", "get", "--study", first.StudyInstanceUID, "--series", rows[0]["SeriesInstanceUID"],
                    "--out", tmp_path / "back", *web]), "WADO")  # fmt: skip
    # Assert
    out = ok(run, "segment over DICOMweb")
    assert "by WADO-RS" in run.stderr and "by STOW-RS" in out and "revealed to the data owner only" in out
    assert len(rows) == 1 and rows[0]["Modality"] == "SEG"
    sources = [pydicom.dcmread(f) for f in meta["files"]]
    labels, _ = read_seg_labels(next((tmp_path / "back").rglob("*.dcm")), sources)
    np.testing.assert_array_equal(labels, threshold_labels(hu))
    assert 0.2 < labels.mean() < 0.9
