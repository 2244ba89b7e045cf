"""``--store`` (and ``--precompute N``) for whole jobs of the two-party mode: `privmed validate
--parties 2` (a study, one stored set per image) and `privmed segment --parties 2` (a volume,
one set per batch of slices), each run with the model owner as a child process over mutual TLS
(``run_local_session_2p``), as ``test_twoparty_precompute`` does for `privmed infer`.

Claims: the sets are consumed (files gone on both sides, counted in the summary); the outputs
equal those of the same job without the store (a stored set is the same offline phase, made
earlier); a store that does not match (another plan, another batch size, no set left) is not
an error: the job computes its offline phase inline and says why in one line.

Tolerances: validate compares the demo model's probabilities of a stored and an inline session
within 16 ulp of its 16 fractional bits (2.4e-4; the two sessions draw different shares, so
the truncations' -1..+2 ulp differ; the store tests measure 0.11 ulp) and against plaintext
within validate's 1e-3. Segment uses a per-pixel threshold model whose answer is known
exactly (``test_segment_support``; here with a ReLU, so that OT material is stored too), so
masks are compared for equality.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from privmed.cli.main import main
from privmed.evaluate.store import ImageResult

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

DEMO = Path(__file__).resolve().parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx"
ULP16 = 16 * 2.0**-16


def _validate(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    from privmed.data.datasets import demo_study_path

    argv = ["validate", "--parties", "2", "--model", str(DEMO), *map(str, args)]
    if "--precompute" not in argv:
        argv += ["--data", str(demo_study_path()), "--no-report"]
    assert main(argv) == 0
    return capsys.readouterr().out


def _rows(out: Path) -> dict[str, ImageResult]:
    from privmed.evaluate.store import ResultStore

    with ResultStore.open(out, create=False) as store:
        return {r.image_id: r for r in store.rows()}


def test_validate_consumes_a_stored_set_per_image_and_matches_the_inline_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: one set for a study of two images
    st = tmp_path / "st"
    pre = _validate(capsys, "--precompute", "1", "--store", st)
    assert "precomputed 1 sets of 1 image(s)" in pre and (st / "data-owner" / "set-0000.npz").exists()

    # Execute: the study on the store, then the same study without it
    stored = _validate(capsys, "--out", tmp_path / "r1", "--limit", "2", "--store", st)
    inline = _validate(capsys, "--out", tmp_path / "r0", "--limit", "2")

    # Assert: image 1 on the set (deleted on both sides), image 2 inline with its one-line reason
    assert "1 of 2 images ran on precomputed sets (online only), 0 sets left" in stored, stored
    notes = [line for line in stored.splitlines() if "offline phase computed inline" in line]
    assert len(notes) == 1 and "has no precomputed set left (1 used)" in notes[0], stored
    assert "offline" in stored and "online" in stored and "store" not in inline.split("two-party sessions")[1]
    assert not any((st / role / "set-0000.npz").exists() for role in ("data-owner", "model-owner"))
    with_store, without = _rows(tmp_path / "r1"), _rows(tmp_path / "r0")
    assert with_store.keys() == without.keys() and len(with_store) == 2
    for key, row in with_store.items():
        np.testing.assert_allclose(row.secure_output, without[key].secure_output, rtol=0, atol=ULP16)
        np.testing.assert_allclose(row.secure_output, row.plain_output, rtol=0, atol=1e-3)


def test_validate_store_of_another_plan_falls_back_inline_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare: one set for the default plan
    st = tmp_path / "st"
    _validate(capsys, "--precompute", "1", "--store", st)

    # Execute: a study compiled with other fractional bits (another plan)
    out = _validate(capsys, "--out", tmp_path / "r", "--limit", "1", "--store", st, "--frac-bits", "12")

    # Assert: inline, one line naming both plans; the set stays for a session of its plan
    notes = [line for line in out.splitlines() if "offline phase computed inline" in line]
    assert len(notes) == 1 and "was precomputed for plan" in notes[0] and "this session's plan is" in notes[0], out
    assert "0 of 1 images ran on precomputed sets (online only), 1 sets left" in out, out
    assert (st / "data-owner" / "set-0000.npz").exists() and (st / "model-owner" / "set-0000.npz").exists()
    row = next(iter(_rows(tmp_path / "r").values()))
    np.testing.assert_allclose(row.secure_output, row.plain_output, rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--store", "st", "--out", "r", "--data", "d"], "for the two-party mode (--parties 2)"),
        (["--parties", "2", "--precompute", "1"], "--precompute needs --store DIR"),
        (["--parties", "2", "--precompute", "1", "--store", "st", "--data", "d"], "no --data or --out"),
        (["--parties", "2", "--store", "st", "--out", "r", "--data", "d", "--workers", "2"], "use --workers 1"),
        (["--parties", "2", "--store", "st"], "--data and --out are required"),
    ],
)
def test_validate_store_options_refused_in_one_line(tmp_path: Path, argv: list[str], message: str,
                                                    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    from privmed.data.datasets import demo_study_path

    argv = [str(demo_study_path()) if a == "d" else a for a in argv]
    assert main(["validate", "--model", str(DEMO), *argv]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "st").exists() and not (tmp_path / "r").exists()


def _relu_threshold_model(path: Path) -> Path:
    """``test_segment_support.threshold_model`` (2-D, 16 x 16) with the logits ReLU(-z), ReLU(z)
    for z = s (x - t): foreground exactly where the oracle says (no ties: |z| >= s/800 > 0)."""
    import onnx
    from onnx import helper, numpy_helper

    from tests.unit.test_segment_support import threshold_model

    base = onnx.load(str(threshold_model(path, 2, 16)))
    g = base.graph
    w, b = (numpy_helper.to_array(t) for t in g.initializer)
    w2, b2 = np.concatenate([-w[1:], w[1:]]), np.array([-b[1], b[1]], np.float32)
    nodes = [helper.make_node("Conv", ["input", "w", "b"], ["z"], kernel_shape=[1, 1]), helper.make_node("Relu", ["z"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["output"], axis=1)]  # fmt: skip
    graph = helper.make_graph(nodes, "relu_threshold", list(g.input), list(g.output),
                              [numpy_helper.from_array(w2, "w"), numpy_helper.from_array(b2, "b")])  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = base.ir_version
    helper.set_model_props(model, {p.key: p.value for p in base.metadata_props})
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _segment(capsys: pytest.CaptureFixture[str], model: Path, *args: object) -> str:
    assert main(["segment", "--parties", "2", "--model", str(model), "--frac-bits", "10", *map(str, args)]) == 0
    return capsys.readouterr().out


def test_segment_consumes_stored_sets_pads_the_last_batch_and_matches_the_inline_run(tmp_path: Path,
                                                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    import nibabel as nib

    from privmed.data.synth_ct import ct_affine, ct_phantom
    from privmed.data.writers import write_nifti
    from tests.unit.test_segment_support import threshold_labels

    # Prepare: 10 slices of 16 x 16 (the model's size: no resampling), 3 sets of 4 slices
    hu = np.rint(ct_phantom(np.random.default_rng(12), (16, 16, 16))[0])[:10]
    ct = write_nifti(tmp_path / "ct.nii.gz", hu.astype(np.int16), ct_affine(hu.shape, (2.0, 0.8, 0.8)))
    model, st = _relu_threshold_model(tmp_path / "t2.onnx"), tmp_path / "st"
    pre = _segment(capsys, model, "--precompute", "3", "--chunk", "4", "--store", st)
    assert "precomputed 3 sets of 4 slice(s)" in pre, pre

    # Execute: the volume on the store (batches take the sets' size, 4 + 4 + 2 padded to 4), then inline
    stored = _segment(capsys, model, "--input", ct, "--output", tmp_path / "m1.nii.gz", "--store", st, "--stats", tmp_path / "s1.json")
    inline = _segment(capsys, model, "--input", ct, "--output", tmp_path / "m0.nii.gz", "--chunk", "4")
    mismatched = _segment(capsys, model, "--input", ct, "--output", tmp_path / "m2.nii.gz", "--store", st, "--chunk", "8")

    # Assert
    assert "3 of 3 batches ran on precomputed sets (online only), 0 sets left" in stored, stored
    assert "last batch padded with 2 copies of its last input" in stored and "(from the store for 3 of 3 batches)" in stored
    assert not any((st / role / f"set-{i:04d}.npz").exists() for role in ("data-owner", "model-owner") for i in range(3))
    session = json.loads((tmp_path / "s1.json").read_text())["session"]
    assert session["precomputed_batches"] == 3 and session["offline_bytes"] < 10_000 and session["online_bytes"] > 0
    assert "from the store" not in inline and "offline" in inline
    notes = [line for line in mismatched.splitlines() if "offline phase computed inline" in line]
    assert len(notes) == 1 and "holds sets of batch size 4, this batch has 8" in notes[0], mismatched
    want = threshold_labels(hu)
    for name in ("m1", "m0", "m2"):
        np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / f"{name}.nii.gz")).dataobj), want)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--parties", "2", "--precompute", "2", "--store", "st"], "--precompute needs --chunk K, the slices or patches per set (at most"),
        (["--parties", "2", "--precompute", "2", "--chunk", "4", "--store", "st", "--output", "m.nii.gz"], "no --input, --output or --from-pacs"),
        (["--store", "st", "--input", "ct.nii.gz", "--output", "m.nii.gz"], "for the two-party mode (--parties 2)"),
        (["--parties", "2", "--store", "st", "--input", "ct.nii.gz", "--output", "m.nii.gz", "--plaintext"], "not with --plaintext"),
    ],
)
def test_segment_store_options_refused_in_one_line(tmp_path: Path, argv: list[str], message: str,
                                                   capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    model = _relu_threshold_model(tmp_path / "t2.onnx")
    assert main(["segment", "--model", str(model), *argv]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "st").exists() and not (tmp_path / "m.nii.gz").exists()
