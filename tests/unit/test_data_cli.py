"""`privmed data synth` and `privmed data inspect` through the CLI entry point."""

from __future__ import annotations

from pathlib import Path

import pytest

from privmed.cli.main import main


def test_synth_chest_then_inspect(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    rc = main(["data", "synth", "chest", "--out", str(out), "--sites", "2", "--n", "3",
               "--size", "32", "--format", "dicom", "--seed", "1"])  # fmt: skip
    assert rc == 0
    assert len(list((out / "images").glob("*.dcm"))) == 6
    (out / "images" / "00000002_000.dcm").write_bytes(b"corrupt")
    capsys.readouterr()

    rc = main(["data", "inspect", str(out)])

    text = capsys.readouterr().out
    assert rc == 0
    assert "layout  chestxray14" in text
    assert "images  5 loaded, 1 skipped" in text
    assert "findings (4): opacity, nodule, effusion, cardiomegaly" in text
    assert any(line.startswith("site_a ") and line.split()[1] == "2" for line in text.splitlines())
    assert "00000002_000.dcm: not a DICOM file (missing preamble)" in text


def test_synth_ct(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["data", "synth", "ct", "--out", str(tmp_path), "--n", "2", "--size", "16"])
    assert rc == 0 and len(list((tmp_path / "imagesTr").glob("*.nii.gz"))) == 2
    main(["data", "inspect", str(tmp_path)])
    assert "layout  nifti-pairs" in capsys.readouterr().out


def test_inspect_error_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    rc = main(["data", "inspect", str(tmp_path / "empty")])
    err = capsys.readouterr().err
    assert rc == 2 and err.strip() == f"privmed: error: {tmp_path / 'empty'}: empty folder"
