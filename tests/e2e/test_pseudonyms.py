"""No patient identifier in anything `privmed validate` writes: headers and file names seeded, then searched.

A DICOM chest study whose headers carry recognisable patient names, IDs and birth dates, whose
files are named after the patients (as exported by some PACS), plus one unreadable file named
the same way, goes through the real `privmed validate` (three parties over TLS) and `privmed
report`. Every byte of the results folder (SQLite database, report.html, summary.json) and
everything the commands printed is then searched for each seeded value: none may appear.
The images are still all there, named by the data owner's keyed pseudonyms.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pydicom
import pytest

from privmed.data.pseudonym import Pseudonymizer, image_identity, load_or_create_key
from privmed.data.synth import synth_chest_study
from privmed.evaluate.store import ResultStore

from .conftest import run_privmed

SHIPPED = Path(__file__).parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx"
N_IMAGES = 5


def seeded_study(root: Path) -> tuple[Path, list[str]]:
    """The synthetic DICOM study with patients named in headers, file names and labels.csv."""
    synth_chest_study(root / "synth", sites=1, n_per_site=N_IMAGES, size=64, fmt="dicom", seed=3)
    study = root / "study"
    (study / "images").mkdir(parents=True)
    secrets: list[str] = []
    with open(root / "synth" / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        name, pid, born = f"ZEBEDEE{i}^QUIMBY", f"PIDX{i:03d}77", f"1923112{i}"
        ds = pydicom.dcmread(root / "synth" / "images" / row["Image Index"])
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, born
        file_name = f"ZEBEDEE{i}_{pid}.dcm"
        ds.save_as(study / "images" / file_name)
        row["Image Index"], row["Patient ID"] = file_name, pid
        secrets += [f"ZEBEDEE{i}", pid, born]
    bad = "ZEBEDEE9_PIDX00977.dcm"  # unreadable, named after a patient too
    (study / "images" / bad).write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00truncated")
    rows.append({**rows[0], "Image Index": bad, "Patient ID": "PIDX00977"})
    secrets += ["ZEBEDEE9", "PIDX00977", "QUIMBY"]
    with open(study / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return study, secrets


def test_seeded_patient_names_and_ids_never_appear_in_validation_results_or_output(tmp_path: Path) -> None:
    # Prepare
    study, secrets = seeded_study(tmp_path)
    out = tmp_path / "results"
    # Execute
    runs = [run_privmed("validate", "--model", SHIPPED, "--data", study, "--out", out, "--per-session", "8", timeout_s=300),
            run_privmed("report", out, timeout_s=120)]  # fmt: skip
    # Assert: it ran, every readable image is stored under a pseudonym
    for run in runs:
        assert run.returncode == 0, run.stderr
    with ResultStore.open(out, create=False) as store:
        rows = list(store.rows())
    pseudonyms = Pseudonymizer(load_or_create_key())
    expected = {pseudonyms.of(image_identity(f, study)) for f in sorted((study / "images").glob("*.dcm"))[:N_IMAGES]}
    assert {r.image_id for r in rows} == expected and all(r.status == "ok" for r in rows)
    assert {r.image_id for r in rows} == {pseudonyms.of("sop:" + pydicom.dcmread(f).SOPInstanceUID)
                                          for f in sorted((study / "images").glob("*.dcm"))[:N_IMAGES]}  # fmt: skip
    # Assert: no seeded value anywhere in the results folder or in what the commands printed
    written = {f: f.read_bytes() for f in out.rglob("*") if f.is_file()}
    assert {f.name for f in written} >= {"results.sqlite", "report.html", "summary.json"}
    printed = "".join(r.stdout + r.stderr for r in runs)
    for secret in secrets:
        leaks = [f.name for f, data in written.items() if secret.encode() in data or secret.lower().encode() in data]
        assert not leaks, f"{secret!r} written into {leaks}"
        assert secret not in printed, f"{secret!r} printed by the CLI"
    assert str(study) not in printed and str(study).encode() not in b"".join(written.values())
    # Assert: the data owner (same key) can map each stored pseudonym back to its file
    mapping = run_privmed("data", "pseudonym", study, timeout_s=60)
    back = dict(line.split("\t") for line in mapping.stdout.splitlines())
    assert {back[r.image_id] for r in rows} == {str(f) for f in sorted((study / "images").glob("*.dcm"))[:N_IMAGES]}
    summary = json.loads(written[out / "summary.json"])
    bad = pseudonyms.of(image_identity(study / "images" / "ZEBEDEE9_PIDX00977.dcm", study), "file")
    assert [line.split(":")[0] for line in summary["data_skipped"]] == [bad]  # reported, by pseudonym


@pytest.mark.parametrize("bad", ["", "zz" * 32, "ab" * 16])
def test_a_malformed_key_file_is_refused_naming_it(tmp_path: Path, bad: str) -> None:
    from privmed.errors import ConfigError

    (tmp_path / "k").write_text(bad)
    with pytest.raises(ConfigError, match=r"k: expected a pseudonym key of 64 hex digits"):
        load_or_create_key(tmp_path / "k")


def test_pseudonyms_depend_on_the_key_and_are_stable_and_the_key_is_private(tmp_path: Path) -> None:
    key = load_or_create_key(tmp_path / "new" / "pseudonym.key")
    again = load_or_create_key(tmp_path / "new" / "pseudonym.key")
    other = load_or_create_key(tmp_path / "other.key")
    assert key == again and key != other and len(key) == 32
    assert (tmp_path / "new" / "pseudonym.key").stat().st_mode & 0o777 == 0o600
    a, b = Pseudonymizer(key), Pseudonymizer(other)
    assert a.of("sop:1.2.3") == Pseudonymizer(again).of("sop:1.2.3") != b.of("sop:1.2.3")
    assert a.of("sop:1.2.3").startswith("img-") and len(a.of("sop:1.2.3")) == 20
    a.hide("img-x", ["/data/DOE_JOHN/scan.dcm", "scan.dcm"])
    assert a.scrub("/data/DOE_JOHN/scan.dcm: unreadable (scan.dcm)") == "img-x: unreadable (img-x)"
    shutil.rmtree(tmp_path / "new")


def test_resuming_a_study_under_another_key_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other pseudonyms would make every stored image look new and count it twice."""
    from privmed.errors import InputError
    from privmed.evaluate.runner import ValidateOptions, run_validation

    from .test_validate_support import InsecureTestPerturbation, make_study_and_model

    study, model = make_study_and_model(tmp_path / "study")
    monkeypatch.setenv("PRIVMED_PSEUDONYM_KEY", str(tmp_path / "first.key"))
    run_validation(model, study, tmp_path / "out", ValidateOptions(limit=2), secure_infer=InsecureTestPerturbation())
    monkeypatch.setenv("PRIVMED_PSEUDONYM_KEY", str(tmp_path / "second.key"))
    with pytest.raises(InputError, match=r"study was started with pseudonym_key_id = '[0-9a-f]{16}', got '[0-9a-f]{16}'"):
        run_validation(model, study, tmp_path / "out", ValidateOptions(), secure_infer=InsecureTestPerturbation())
