"""`privmed train` end to end through the CLI entry point (tiny data, one or two epochs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from privmed.cli.main import main
from privmed.data.synth import synth_chest_study


@pytest.fixture(autouse=True)
def _restore_threads():  # the CLI sets torch's thread count; give the next test its own back
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_train_cli_writes_artefacts_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    data = synth_chest_study(tmp_path / "data", sites=2, n_per_site=40, seed=0)

    code = main(["train", "--data", str(data), "--model", "small-cnn", "--out",
                 str(tmp_path / "out"), "--epochs", "2", "--val-site", "site_a", "--name", "m"])  # fmt: skip

    out = capsys.readouterr().out
    assert code == 0
    assert "epoch   1/2" in out and "epoch   2/2" in out
    assert "held-out site site_a" in out and "cardiomegaly" in out
    for suffix in (".onnx", ".preprocess.json", ".metrics.json"):
        assert (tmp_path / "out" / f"m{suffix}").is_file()
    metrics = json.loads((tmp_path / "out" / "m.metrics.json").read_text())
    assert metrics["settings"]["val_site"] == "site_a" and metrics["epochs_run"] == 2


def test_train_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--data", str(tmp_path / "missing"), "--model", "small-cnn",
                 "--out", str(tmp_path / "out")])  # fmt: skip

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("privmed: error:") and "missing" in err
    assert err.count("\n") == 1


def test_train_cli_unknown_model_lists_choices(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "x", "--model", "vgg16", "--out", "y"])

    assert info.value.code == 2
    assert "densenet121" in capsys.readouterr().err
