"""Training: tiny runs learn, artefacts are consistent, splits and metrics are right."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from sklearn.metrics import roc_auc_score

from privmed.data.datasets import load_study
from privmed.data.preprocess import Preprocess, load_for_model
from privmed.data.synth import synth_chest_study, synth_ct_study
from privmed.errors import InputError
from privmed.models.export import read_metadata
from privmed.models.train import train_classifier, train_segmenter


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _reject_nan(token: str) -> float:
    raise AssertionError(f"metrics.json is not strict JSON: {token}")


@pytest.fixture(scope="module")
def chest_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth_chest_study(tmp_path_factory.mktemp("chest"), sites=2, n_per_site=150, seed=0)


def test_tiny_classifier_beats_chance_on_held_out_site(chest_study: Path, tmp_path: Path) -> None:
    result = train_classifier(
        chest_study, "small-cnn", tmp_path, epochs=10, batch_size=16, seed=0, val_site="site_b",
        name="chest",
    )  # fmt: skip

    held = result.metrics["held_out"]
    # Chance is 0.5 with sd ~0.05 per finding on 150 images; an untrained or broken
    # pipeline stays near it. Effusion and cardiomegaly are large, easy findings.
    assert held["n"] == 150 and held["site"] == "site_b"
    assert held["mean_auroc"] > 0.7
    assert held["auroc"]["effusion"] > 0.8 and held["auroc"]["cardiomegaly"] > 0.8
    assert result.metrics["split"]["test"] == {"site_b": 150}
    assert "site_b" not in result.metrics["split"]["train"]
    assert "site_b" not in result.metrics["split"]["tune"]


def test_classifier_artefacts_reproduce_the_reported_auroc(
    chest_study: Path, tmp_path: Path
) -> None:
    """Oracle path: data layer's load_for_model + the sidecar + onnxruntime + sklearn."""
    result = train_classifier(
        chest_study, "small-cnn", tmp_path, epochs=2, seed=1, val_site="site_b", name="m"
    )
    study = load_study(chest_study)
    pre = Preprocess.load(result.preprocess_path)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    records = [r for r in study.records if r.site == "site_b"]

    probs = np.concatenate(
        [session.run(None, {"input": load_for_model(r.path, pre)})[0] for r in records]
    )
    labels = study.labels(records)

    metrics = json.loads(result.metrics_path.read_text(), parse_constant=_reject_nan)
    assert json.loads(read_metadata(result.onnx_path)["privmed.labels"]) == study.findings
    assert pre.size == (64, 64) and pre.normalize == "zscore"
    assert ((probs >= 0) & (probs <= 1)).all()  # the exported graph ends in Sigmoid
    for k, finding in enumerate(study.findings):
        expected = roc_auc_score(labels[:, k], probs[:, k])
        assert metrics["held_out"]["auroc"][finding] == pytest.approx(expected, abs=1e-9)
    assert metrics["held_out"]["max_abs_diff_onnx_vs_torch"] < 1e-5


def test_same_seed_same_model(chest_study: Path, tmp_path: Path) -> None:
    a = train_classifier(chest_study, "small-cnn", tmp_path / "a", epochs=1, seed=3)
    b = train_classifier(chest_study, "small-cnn", tmp_path / "b", epochs=1, seed=3)

    assert a.metrics["onnx"]["sha256"] == b.metrics["onnx"]["sha256"]
    assert "held_out" not in a.metrics  # no --val-site: tune split only


def test_unknown_val_site_names_the_sites(chest_study: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="site_a, site_b"):
        train_classifier(chest_study, "small-cnn", tmp_path, epochs=1, val_site="site_z")


def test_classifier_rejects_a_unet(chest_study: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="small-cnn"):
        train_classifier(chest_study, "unet2d", tmp_path, epochs=1)


def test_tiny_unet2d_learns_the_lungs(tmp_path: Path) -> None:
    study = synth_ct_study(tmp_path / "ct", n_volumes=6, shape=(16, 32, 32), seed=0, sites=2)

    result = train_segmenter(
        study, "unet2d", tmp_path / "out", epochs=10, batch_size=8, seed=0, size=32,
        val_site="site_b",
    )  # fmt: skip

    held = result.metrics["held_out"]
    assert held["volumes"] == 3
    # An untrained net's lung Dice is ~0.2 (measured); the lungs are large and easy.
    assert held["dice"]["lung"] > 0.7
    assert result.metrics["classes"] == ["background", "lung", "lesion"]
    assert result.metrics["input_shape"] == [1, 1, 32, 32]
    pre = Preprocess.load(result.preprocess_path)
    assert pre.window == (-400.0, 1600.0)


def test_unet3d_trains_one_epoch_and_exports(tmp_path: Path) -> None:
    study = synth_ct_study(tmp_path / "ct", n_volumes=3, shape=(16, 16, 16), seed=0, sites=1)

    result = train_segmenter(study, "unet3d", tmp_path / "out", epochs=1, batch_size=2, size=16)

    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.zeros((1, 1, 16, 16, 16), np.float32)})[0]
    assert out.shape == (1, 3, 16, 16, 16)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)  # final Softmax
    assert result.metrics["epochs_run"] == 1 and len(result.metrics["history"]) == 1
