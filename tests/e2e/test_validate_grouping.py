"""Several images per secure session (`privmed validate --per-session K`).

With the real three-party engine: a group's secure outputs are as faithful as one session
per image, each image needs the same rounds, the weights and set-up are shared out (bytes
per image below the one-session-per-image figure, and equal across the group), and an image
that cannot be preprocessed becomes an error row while the rest of its group runs. With the
``InsecureTestPerturbation`` stand-in: a failing group session falls back to one session per
image, a ModelError does not, and a SIGKILL between two rows of one group loses nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from privmed.cli.main import main
from privmed.data.pseudonym import Pseudonymizer, image_identity, load_or_create_key
from privmed.errors import ModelError, PeerError
from privmed.evaluate.runner import ValidateOptions, run_validation
from privmed.evaluate.store import ImageResult, ResultStore

from .test_validate_support import InsecureTestPerturbation, make_study_and_model

SHIPPED_MODEL = (
    Path(__file__).resolve().parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx"
)
BAD = "00000002_000.npy"  # second image of the copied demo study, 4 channels


def _rows(out: Path) -> dict[str, ImageResult]:
    with ResultStore.open(out, create=False) as store:
        return {r.image_id: r for r in store.rows()}


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict, Path]:
    """The demo study with image 2 replaced by a 4-channel array (it reads, so the study
    loader keeps it, but preprocessing refuses it), through the real engine: the first 3
    images one session each, then the first 4 with --per-session 4: one group, whose session
    runs the 3 good images."""
    from privmed.data.datasets import demo_study_path

    root = tmp_path_factory.mktemp("grouping")
    study = root / "study"
    shutil.copytree(demo_study_path(), study)
    labels = study / "labels.csv"
    labels.write_text(labels.read_text().replace(BAD.replace(".npy", ".png"), BAD))
    (study / "images" / BAD.replace(".npy", ".png")).unlink()
    np.save(study / "images" / BAD, np.zeros((64, 64, 4), np.float32))
    common = ["validate", "--model", str(SHIPPED_MODEL), "--data", str(study), "--no-report"]
    assert main([*common, "--out", str(root / "one"), "--per-session", "1", "--workers", "2",
                 "--limit", "3"]) == 0  # fmt: skip
    assert main([*common, "--out", str(root / "four"), "--per-session", "4", "--limit", "4"]) == 0
    return _rows(root / "one"), _rows(root / "four"), root / "four"


def test_grouped_session_is_as_faithful_and_cheaper_per_image(engine_runs) -> None:
    one, four, _ = engine_runs
    good = [r for r in four.values() if r.status == "ok"]
    assert len(one) == 3 and len(four) == 4 and len(good) == 3
    for r in good:
        # the tolerance of test_validate_engine.py: a few 2^-16 per linear layer; a wrong
        # share, sign or scale gives errors of order 0.1
        np.testing.assert_allclose(r.secure_output, r.plain_output, atol=1e-3)
        assert r.session_images == 3 and r.secure_s > r.online_s > 0
    for image_id, alone in one.items():
        if alone.status != "ok":
            continue
        grouped = four[image_id]
        np.testing.assert_array_equal(grouped.plain_output, alone.plain_output)
        assert alone.session_images == 1
        # same protocol per image: the group does not add or save rounds
        assert grouped.rounds == alone.rounds and alone.rounds > 0
        # the weights and set-up (~146 kB of 1.68 MB) are paid once per 3 images
        assert sum(grouped.bytes_by_role.values()) < sum(alone.bytes_by_role.values())
    # the weights travel during the first batch but are charged to all three evenly
    totals = [sum(r.bytes_by_role.values()) for r in good]
    assert max(totals) - min(totals) <= 1


def test_unpreprocessable_image_in_a_group_is_an_error_row(engine_runs) -> None:
    one, four, four_dir = engine_runs
    study = four_dir.parent / "study"  # stored under the data owner's pseudonym of its path
    bad_id = Pseudonymizer(load_or_create_key()).of(image_identity(study / "images" / BAD, study))
    for rows in (one, four):
        bad = rows[bad_id]
        assert bad.status == "error" and bad.error.startswith("preprocess: InputError: ")
        assert "got (64, 64, 4)" in bad.error and bad.secure_output is None
        assert bad.session_images is None


def test_report_says_images_shared_sessions(engine_runs) -> None:
    from privmed.evaluate.report import build_report

    html, _, summary = build_report(engine_runs[2])
    assert summary["costs"]["session_images"]["median"] == 3
    page = html.read_text()
    assert "images per secure session" in page and "Images shared secure sessions" in page


@pytest.fixture(scope="module")
def study_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_study_and_model(tmp_path_factory.mktemp("grouping_fake"))


def test_failing_group_session_falls_back_to_one_session_per_image(study_model, tmp_path) -> None:
    # Prepare: every session with more than one image fails; call 3 (the second image of the
    # first group, run alone) fails too
    study_dir, model = study_model
    flaky = InsecureTestPerturbation(fail_groups=PeerError("dealer: lost connection"),
                                     fail_calls={3: PeerError("model-owner: timed out")})  # fmt: skip
    # Execute
    run = run_validation(model, study_dir, tmp_path, ValidateOptions(images_per_session=4),
                         secure_infer=flaky)  # fmt: skip
    # Assert: each group of 4 tried once, then its images one by one; one image failed alone
    rows = list(_rows(tmp_path).values())
    assert flaky.sizes == [4, 1, 1, 1, 1, 4, 1, 1, 1, 1]
    assert (run.ok, run.failed) == (7, 1)
    (bad,) = [r for r in rows if r.status == "error"]
    assert bad.error == "secure inference: PeerError: model-owner: timed out"
    assert all(r.session_images == 1 and r.rounds == 15 for r in rows if r.status == "ok")


def test_model_error_in_a_group_stops_without_fallback(study_model, tmp_path) -> None:
    study_dir, model = study_model
    broken = InsecureTestPerturbation(fail_groups=ModelError("chest.onnx: unsupported op Foo"))
    with pytest.raises(ModelError, match="unsupported op"):
        run_validation(model, study_dir, tmp_path, ValidateOptions(images_per_session=4),
                       secure_infer=broken)  # fmt: skip
    assert broken.sizes == [4] and _rows(tmp_path) == {}


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[1])
    from e2e.test_validate_support import InsecureTestPerturbation
    from privmed.evaluate.runner import ValidateOptions, run_validation

    def die_after_two(p):  # SIGKILL between the 2nd and 3rd row of the first group of 4
        if p.done == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    run_validation(sys.argv[2], sys.argv[3], sys.argv[4], ValidateOptions(images_per_session=4),
                   secure_infer=InsecureTestPerturbation(), progress=die_after_two)
    """
)


def test_sigkill_between_rows_of_a_group_reruns_only_the_rest(study_model, tmp_path) -> None:
    # Prepare
    study_dir, model = study_model
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "out"
    # Execute: the child stores two rows of its first group of four, then is killed
    child = subprocess.run([sys.executable, str(script), str(Path(__file__).resolve().parents[1]),
                            str(model), str(study_dir), str(out)], timeout=60)  # fmt: skip
    killed = _rows(out)
    final = InsecureTestPerturbation()
    run = run_validation(model, study_dir, out, ValidateOptions(images_per_session=4),
                         secure_infer=final)  # fmt: skip
    # Assert: the two stored rows stay, the other 6 images run once, each image stored once
    assert child.returncode == -signal.SIGKILL and len(killed) == 2
    rows = _rows(out)
    assert (run.already_done, run.processed, final.images) == (2, 6, 6)
    assert len(rows) == 8 and all(r.status == "ok" for r in rows.values())
    for image_id, r in killed.items():
        np.testing.assert_array_equal(rows[image_id].secure_output, r.secure_output)
        assert (
            rows[image_id].run_id
            == r.run_id
            != rows[next(k for k in rows if k not in killed)].run_id
        )
    assert os.path.exists(out / "results.sqlite")


def test_per_session_must_be_positive(study_model, tmp_path, capsys) -> None:
    study_dir, model = study_model
    rc = main(["validate", "--model", str(model), "--data", str(study_dir), "--out", str(tmp_path),
               "--per-session", "0"])  # fmt: skip
    assert rc != 0 and "--per-session: expected at least 1, got 0" in capsys.readouterr().err
