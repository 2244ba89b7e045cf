"""run_validation bookkeeping: every image stored once, resume, failures, workers, refusals.

The secure engine is replaced by ``InsecureTestPerturbation`` (onnxruntime + noise) here;
tests/e2e/test_validate_engine.py runs the real three-party engine.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from privmed.data.datasets import load_study as load_plain_study
from privmed.data.preprocess import Preprocess, load_for_model, sidecar_path
from privmed.data.pseudonym import (
    Pseudonymizer,
    image_identity,
    load_or_create_key,
    pseudonymise_study,
)
from privmed.errors import InputError, ModelError, PeerError, PrivmedError
from privmed.evaluate.report import build_report
from privmed.evaluate.runner import ValidateOptions, run_validation
from privmed.evaluate.store import ResultStore

from .test_validate_support import FINDINGS, InsecureTestPerturbation, make_study_and_model


def load_study(study_dir: Path):  # type: ignore[no-untyped-def]
    """The study as the runner names its images: by the data owner's keyed pseudonyms."""
    study = load_plain_study(study_dir)
    pseudonymise_study(study, Pseudonymizer(load_or_create_key()))
    return study


@pytest.fixture(scope="module")
def study_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_study_and_model(tmp_path_factory.mktemp("validate"))


def _rows(out: Path) -> list:
    with ResultStore.open(out, create=False) as store:
        return list(store.rows())


def test_every_image_stored_with_plaintext_matching_onnxruntime(study_model, tmp_path) -> None:
    # Prepare
    study_dir, model = study_model
    fake = InsecureTestPerturbation(noise=1e-4)
    seen = []
    # Execute
    run = run_validation(model, study_dir, tmp_path, ValidateOptions(workers=2), secure_infer=fake,
                         progress=seen.append)  # fmt: skip
    # Assert
    study = load_study(study_dir)
    rows = {(r.site, r.image_id): r for r in _rows(tmp_path)}
    assert run.total == run.ok == len(study.records) == len(rows) == 8 and run.failed == 0
    assert fake.sizes == [4, 4]  # default 16 per session, 8 images split fairly over 2 workers
    assert [p.done for p in seen] == list(range(1, 9)) and seen[-1].eta_s == 0
    pre = Preprocess.load(sidecar_path(model))
    sess = ort.InferenceSession(str(model))
    for rec in study.records:
        row = rows[(rec.site, rec.image_id)]
        expect = sess.run(None, {"input": load_for_model(rec.path, pre)})[0]
        np.testing.assert_array_equal(row.plain_output, expect)  # same bytes in, same runtime
        np.testing.assert_allclose(row.secure_output, expect, atol=1e-3)  # noise is 1e-4 sd
        np.testing.assert_array_equal(row.labels, rec.labels)  # model labels = study findings
        # the stand-in reports no per-batch stats: its totals (15 rounds etc. per image) are
        # divided evenly over the session's images
        assert row.rounds == 15 and row.bytes_by_role["dealer"] == 300 and row.secure_s >= 0
        assert row.session_images == 4 and row.cpu_s["dealer"] == pytest.approx(0.4)
    with ResultStore.open(tmp_path, create=False) as store:
        assert store.meta()["findings"] == FINDINGS and store.meta()["output_kind"] == "probability"


def test_limit_then_resume_runs_only_the_rest(study_model, tmp_path) -> None:
    study_dir, model = study_model
    first = InsecureTestPerturbation()
    run1 = run_validation(model, study_dir, tmp_path, ValidateOptions(limit=3), secure_infer=first)
    second = InsecureTestPerturbation()
    run2 = run_validation(
        model, study_dir, tmp_path, ValidateOptions(workers=2), secure_infer=second
    )
    third = InsecureTestPerturbation()
    run3 = run_validation(model, study_dir, tmp_path, ValidateOptions(), secure_infer=third)
    assert (run1.processed, first.sizes) == (3, [3])
    assert (run2.already_done, run2.processed, sorted(second.sizes)) == (3, 5, [2, 3])
    assert (run3.already_done, run3.processed, third.calls) == (8, 0, 0)
    keys = [(r.site, r.image_id) for r in _rows(tmp_path)]
    assert len(keys) == len(set(keys)) == 8


def test_failed_image_recorded_others_continue_and_retry(study_model, tmp_path) -> None:
    study_dir, model = study_model
    flaky = InsecureTestPerturbation(fail_calls={2: PeerError("dealer: lost connection")})
    one_each = ValidateOptions(images_per_session=1)
    run = run_validation(model, study_dir, tmp_path, one_each, secure_infer=flaky)
    assert (run.ok, run.failed) == (7, 1)
    (bad,) = [r for r in _rows(tmp_path) if r.status == "error"]
    assert bad.error == "secure inference: PeerError: dealer: lost connection"
    assert bad.plain_output is not None and bad.secure_output is None
    # a plain rerun leaves the error alone; --retry-errors runs exactly that image again
    again = InsecureTestPerturbation()
    assert (
        run_validation(model, study_dir, tmp_path, ValidateOptions(), secure_infer=again).processed
        == 0
    )
    retry = run_validation(
        model, study_dir, tmp_path, ValidateOptions(retry_errors=True), secure_infer=again
    )
    assert (retry.processed, retry.ok, again.calls) == (1, 1, 1)
    assert all(r.status == "ok" for r in _rows(tmp_path))


def test_unreadable_image_is_skipped_and_reported(study_model, tmp_path) -> None:
    # Prepare: a copy of the study with one truncated PNG
    study_dir, model = study_model
    copy = tmp_path / "study"
    shutil.copytree(study_dir, copy)
    with open(copy / "labels.csv", newline="") as f:
        first = next(csv.DictReader(f))["Image Index"]
    (copy / "images" / first).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    # Execute
    run = run_validation(
        model, copy, tmp_path / "out", ValidateOptions(), secure_infer=InsecureTestPerturbation()
    )
    _, _, summary = build_report(tmp_path / "out")
    # Assert
    assert run.total == 7 and run.ok == 7
    named = Pseudonymizer(load_or_create_key()).of(image_identity(copy / "images" / first, copy), "file")
    assert summary["data_skipped"] == [f"{named}: not a readable image (OSError: Truncated File Read)"]
    report = (tmp_path / "out" / "report.html").read_text()
    assert named in report and first not in report  # named by its pseudonym, never by its file name


def test_model_error_stops_the_study_and_keeps_finished_rows(study_model, tmp_path) -> None:
    study_dir, model = study_model
    broken = InsecureTestPerturbation(fail_calls={3: ModelError("chest.onnx: unsupported op Foo")})
    with pytest.raises(ModelError, match="unsupported op"):
        run_validation(model, study_dir, tmp_path, ValidateOptions(images_per_session=1),
                       secure_infer=broken)  # fmt: skip
    assert len(_rows(tmp_path)) == 2


def test_consecutive_failures_stop_the_study(study_model, tmp_path) -> None:
    study_dir, model = study_model
    down = InsecureTestPerturbation(fail_calls={i: PeerError("refused") for i in range(1, 9)})
    with pytest.raises(PrivmedError, match="3 failed images in a row"):
        run_validation(
            model,
            study_dir,
            tmp_path,
            ValidateOptions(max_consecutive_failures=3, images_per_session=1),
            secure_infer=down,
        )
    assert len(_rows(tmp_path)) == 3


def test_workers_run_sessions_at_once(study_model, tmp_path) -> None:
    study_dir, model = study_model
    slow = InsecureTestPerturbation(sleep_s=0.3)
    run = run_validation(model, study_dir, tmp_path, ValidateOptions(workers=4), secure_infer=slow)
    assert run.ok == 8 and slow.max_running == 4
    assert run.elapsed_s < 8 * 0.3  # serial would take at least 2.4 s


def test_refuses_a_different_model_in_the_same_results(study_model, tmp_path) -> None:
    study_dir, model = study_model
    run_validation(
        model,
        study_dir,
        tmp_path,
        ValidateOptions(limit=1),
        secure_infer=InsecureTestPerturbation(),
    )
    other = tmp_path / "other" / "chest.onnx"
    other.parent.mkdir()
    other.write_bytes(model.read_bytes() + b"")
    sidecar_path(other).write_text(sidecar_path(model).read_text())
    # same bytes: accepted (the study is identified by content, not path)
    run_validation(
        other,
        study_dir,
        tmp_path,
        ValidateOptions(limit=2),
        secure_infer=InsecureTestPerturbation(),
    )
    import onnx

    proto = onnx.load(str(other))
    proto.doc_string = "retrained"
    onnx.save(proto, str(other))
    with pytest.raises(InputError, match="model_sha256"):
        run_validation(
            other, study_dir, tmp_path, ValidateOptions(), secure_infer=InsecureTestPerturbation()
        )


def test_missing_preprocess_sidecar(study_model, tmp_path) -> None:
    study_dir, model = study_model
    lone = tmp_path / "lone.onnx"
    lone.write_bytes(model.read_bytes())
    with pytest.raises(InputError, match="preprocess.json"):
        run_validation(
            lone,
            study_dir,
            tmp_path / "out",
            ValidateOptions(),
            secure_infer=InsecureTestPerturbation(),
        )


def test_segmentation_study_gets_dice_and_hd95_against_plaintext_and_truth(tmp_path) -> None:
    # Prepare: 3 synthetic CT volumes with lung/lesion masks, a 3-class softmax segmenter
    from privmed.data.synth_ct import synth_ct_study
    from privmed.evaluate.masks import dice, nearest_resize

    from .test_validate_support import tiny_segmenter_onnx

    study_dir = synth_ct_study(tmp_path / "ct", n_volumes=3, shape=(20, 20, 20))
    model = tiny_segmenter_onnx(tmp_path / "seg.onnx", n_classes=3, side=16)
    Preprocess(size=(16, 16, 16)).save(sidecar_path(model))
    # Execute
    run = run_validation(model, study_dir, tmp_path / "out", ValidateOptions(),
                         secure_infer=InsecureTestPerturbation(noise=1e-4))  # fmt: skip
    _, _, summary = build_report(tmp_path / "out")
    # Assert: truth stored on the output grid; Dice vs truth recomputed from the rows
    study = load_study(study_dir)
    rows = {r.image_id: r for r in _rows(tmp_path / "out")}
    assert run.ok == 3 and set(summary["masks"]) == {"lung", "lesion"}
    dices = []
    for rec in study.records:
        row = rows[rec.image_id]
        truth = nearest_resize(study.read_mask(rec)[0], (16, 16, 16))
        np.testing.assert_array_equal(row.truth_mask, truth)
        dices.append(dice(np.argmax(row.secure_output[0], axis=0) == 1, truth == 1))
    lung = summary["masks"]["lung"]
    assert lung["secure_vs_truth"]["dice"]["median"] == pytest.approx(np.median(dices), abs=1e-12)
    assert lung["secure_vs_plain"]["dice"]["min"] > 0.95  # 1e-4 noise flips only ties
    assert (
        summary["findings"] == []
        and "Segmentation masks" in (tmp_path / "out" / "report.html").read_text()
    )


@pytest.mark.parametrize(("per_session", "kept"), [(1, 2), (4, 8)])
def test_ctrl_c_keeps_the_sessions_already_running(
    study_model, tmp_path, per_session, kept
) -> None:
    # Prepare: 8 images, 2 workers; per_session 4 makes two groups of 4, both running at once
    study_dir, model = study_model
    slow = InsecureTestPerturbation(sleep_s=0.2 / per_session)

    def interrupt(progress: object) -> None:
        raise KeyboardInterrupt  # as if Ctrl-C arrived right after the first image was stored

    # Execute
    with pytest.raises(KeyboardInterrupt):
        run_validation(model, study_dir, tmp_path,
                       ValidateOptions(workers=2, images_per_session=per_session),
                       secure_infer=slow, progress=interrupt)  # fmt: skip
    # Assert: the other session was running when the interrupt came: it finished and was kept,
    # and so was the rest of the group whose first image had just been stored
    assert slow.calls == 2 and len(_rows(tmp_path)) == kept
    rerun = InsecureTestPerturbation()
    assert run_validation(model, study_dir, tmp_path, secure_infer=rerun).processed == 8 - kept
