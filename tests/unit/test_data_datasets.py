"""load_study on every layout, the ChestX-ray14 / CheXpert label conventions and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from privmed.data.datasets import demo_study_path, load_study
from privmed.data.labels import NIH_FINDINGS
from privmed.data.synth import FINDINGS, synth_ct_study
from privmed.errors import InputError

nan = np.nan


def _png(path: Path, value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_chestxray14_table(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "images_001" / "images" / name)  # NIH nests images in sub-folders
    _write(
        tmp_path / "Data_Entry_2017.csv",
        "Image Index,Finding Labels,Follow-up #,Patient ID\n"
        "a.png,Cardiomegaly|Effusion,0,1\n"
        "b.png,No Finding,0,2\n"
        "c.png,Hernia,0,3\n",
    )

    study = load_study(tmp_path)

    assert study.layout == "chestxray14"
    assert study.findings == NIH_FINDINGS  # the published order and full label set
    labels = {r.image_id: r.labels for r in study.records}
    expected_a = np.zeros(14, np.float32)
    expected_a[[NIH_FINDINGS.index("Cardiomegaly"), NIH_FINDINGS.index("Effusion")]] = 1
    np.testing.assert_array_equal(labels["a.png"], expected_a)
    np.testing.assert_array_equal(labels["b.png"], np.zeros(14))
    assert labels["c.png"][NIH_FINDINGS.index("Hernia")] == 1
    assert study.sites() == [tmp_path.name] and study.skipped == []


CHEXPERT_CSV = (
    "Path,Sex,Age,Frontal/Lateral,AP/PA,No Finding,Cardiomegaly,Lung Opacity,Pleural Effusion\n"
    "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg,F,68,Frontal,AP,1.0,,,0.0\n"
    "CheXpert-v1.0-small/train/patient00002/study1/view1_frontal.jpg,M,87,Frontal,AP,,-1.0,1.0,-1.0\n"
    "CheXpert-v1.0-small/train/patient00003/study1/view1_frontal.jpg,M,40,Frontal,PA,,2.0,,\n"
)


@pytest.mark.parametrize(
    ("uncertain", "blank", "row2"),
    [
        ("zeros", "zeros", [0, 0, 1, 0]),
        ("ones", "zeros", [0, 1, 1, 1]),
        ("ignore", "zeros", [0, nan, 1, nan]),
        ("ignore", "nan", [nan, nan, 1, nan]),
    ],
)
def test_chexpert_uncertain_policies(
    tmp_path: Path, uncertain: str, blank: str, row2: list[float]
) -> None:
    root = tmp_path / "CheXpert-v1.0-small"
    for p in (1, 2, 3):
        _png(root / "train" / f"patient0000{p}" / "study1" / "view1_frontal.jpg")
    _write(root / "train.csv", CHEXPERT_CSV)

    study = load_study(root, uncertain=uncertain, blank=blank)

    assert study.layout == "chexpert"
    assert study.findings == ["No Finding", "Cardiomegaly", "Lung Opacity", "Pleural Effusion"]
    first = [1, 0 if blank == "zeros" else nan, 0 if blank == "zeros" else nan, 0]
    np.testing.assert_array_equal(study.records[0].labels, np.array(first, np.float32))
    np.testing.assert_array_equal(study.records[1].labels, np.array(row2, np.float32))
    # row 3 has value 2.0: skipped with row number, column and value; nothing else lost
    assert len(study.records) == 2 and len(study.skipped) == 1
    assert "train.csv row 3: 'Cardiomegaly' value '2.0' not in 1/0/-1/blank" in study.skipped[0][1]


def test_missing_label_column(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _write(tmp_path / "labels.csv", "Image Index,Patient ID\na.png,1\n")
    with pytest.raises(InputError, match=r"labels\.csv: missing label column 'Finding Labels'"):
        load_study(tmp_path)
    _write(tmp_path / "labels.csv", "file,diagnosis\na.png,1\n")
    with pytest.raises(
        InputError, match=r"labels\.csv: missing label columns: expected 'Image Index'"
    ):
        load_study(tmp_path)


def test_empty_and_missing_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("x")
    with pytest.raises(InputError, match=r"empty: empty folder"):
        load_study(tmp_path / "empty")
    with pytest.raises(InputError, match=r"docs: no images or label table found"):
        load_study(tmp_path / "docs")
    with pytest.raises(InputError, match=r"nowhere: no such file or folder"):
        load_study(tmp_path / "nowhere")


def test_corrupt_and_missing_files_are_skipped_and_reported(tmp_path: Path) -> None:
    for i in range(5):
        _png(tmp_path / "images" / f"{i}.png", value=10 * i)
    (tmp_path / "images" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    rows = "".join(f"{i}.png,nodule,site_{i % 2}\n" for i in range(6))  # 5.png does not exist
    _write(tmp_path / "labels.csv", "Image Index,Finding Labels,site\n" + rows)

    study = load_study(tmp_path)

    assert sorted(r.image_id for r in study.records) == ["0.png", "1.png", "3.png", "4.png"]
    reasons = dict((p.name, why) for p, why in study.skipped)
    assert reasons["2.png"].startswith("not a readable image")
    assert reasons["5.png"] == "labels.csv row 6: file not found"
    assert {s: len(r) for s, r in study.by_site().items()} == {"site_0": 2, "site_1": 2}
    assert study.findings == FINDINGS  # a subset of the synthetic findings keeps their order


def test_site_folders_merge_with_union_of_findings(tmp_path: Path) -> None:
    _png(tmp_path / "hospital_a" / "x.png")
    _write(tmp_path / "hospital_a" / "train.csv", "Path,Cardiomegaly,Edema\nx.png,1,0\n")
    _png(tmp_path / "hospital_b" / "y.png")
    _write(tmp_path / "hospital_b" / "train.csv", "Path,Fracture,Cardiomegaly\ny.png,1,0\n")

    study = load_study(tmp_path)

    assert study.layout == "site-folders/chexpert"
    assert study.sites() == ["hospital_a", "hospital_b"]
    assert study.findings == ["Cardiomegaly", "Edema", "Fracture"]
    np.testing.assert_array_equal(study.records[0].labels, [1, 0, nan])  # no Fracture column
    np.testing.assert_array_equal(study.records[1].labels, [0, nan, 1])
    assert study.prevalence() == pytest.approx({"Cardiomegaly": 0.5, "Edema": 0.0, "Fracture": 1.0})


def test_class_folders_and_site_class_folders(tmp_path: Path) -> None:
    for cls, n in (("normal", 2), ("pneumonia", 3)):
        for i in range(n):
            _png(tmp_path / "one" / cls / f"{i}.png")
            _png(tmp_path / "multi" / "site_x" / cls / f"{i}.png")
            _png(tmp_path / "multi" / "site_y" / cls / f"{i}.png")

    one = load_study(tmp_path / "one")
    multi = load_study(tmp_path / "multi")

    assert one.layout == "class-folders" and one.findings == ["normal", "pneumonia"]
    assert one.labels().sum(axis=0).tolist() == [2, 3]
    assert multi.layout == "site-folders/class-folders" and multi.sites() == ["site_x", "site_y"]
    assert len(multi.records) == 10


def test_medmnist_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 6), ("val", 2), ("test", 3)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 3, (n, 1))
    np.savez(tmp_path / "pathmnist.npz", **arrays)

    study = load_study(tmp_path)

    assert study.layout == "medmnist" and study.findings == ["class_0", "class_1", "class_2"]
    assert study.sites() == ["train", "val", "test"] and len(study.records) == 11
    rec = study.by_site()["test"][2]
    image, _ = study.read(rec)
    np.testing.assert_array_equal(image, arrays["test_images"][2] / np.float32(255))
    assert rec.labels.argmax() == arrays["test_labels"][2, 0] and rec.labels.sum() == 1


def test_medmnist_multilabel_and_corrupt(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "chestmnist.npz",
        train_images=np.zeros((2, 28, 28), np.uint8),
        train_labels=np.array([[1] + [0] * 13, [0] * 13 + [1]]),
    )
    study = load_study(tmp_path / "chestmnist.npz")
    assert study.findings == NIH_FINDINGS and study.records[1].labels[-1] == 1
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 broken zip")
    with pytest.raises(InputError, match=r"bad\.npz: not a readable \.npz"):
        load_study(tmp_path / "bad.npz")


def test_nifti_pairs_from_synth_ct(tmp_path: Path) -> None:
    synth_ct_study(tmp_path, n_volumes=3, shape=(16, 20, 24), seed=1, sites=2)

    study = load_study(tmp_path)

    assert study.layout == "nifti-pairs" and study.findings == ["lung", "lesion"]
    assert study.sites() == ["site_a", "site_b"]
    rec = study.records[0]
    mask, _ = study.read_mask(rec)
    image, meta = study.read(rec)
    assert mask.shape == image.shape == (16, 20, 24)
    np.testing.assert_array_equal(rec.labels, [1.0, float((mask == 2).any())])
    assert meta["affine"][2, 0] == pytest.approx(2.0)  # slice axis runs superior, 2 mm


def test_nifti_pairs_without_json_and_mismatched_mask(tmp_path: Path) -> None:
    synth_ct_study(tmp_path, n_volumes=2, shape=(16, 16, 16), seed=2, sites=1)
    (tmp_path / "dataset.json").unlink()
    (tmp_path / "imagesTr" / "lung_002.nii.gz").rename(
        tmp_path / "imagesTr" / "lung_002_0000.nii.gz"
    )
    from privmed.data.readers import write_nifti

    write_nifti(tmp_path / "labelsTr" / "lung_001.nii.gz", np.zeros((8, 8, 8), np.uint8))

    study = load_study(tmp_path)

    assert [r.image_id for r in study.records] == ["lung_002"]  # nnU-Net _0000 suffix matched
    assert "mask shape (8, 8, 8) differs from image (16, 16, 16)" in study.skipped[0][1]


def test_shipped_demo_study() -> None:
    study = load_study(demo_study_path())
    assert study.findings == FINDINGS and len(study.records) == 12 and not study.skipped
    assert study.sites() == ["site_a", "site_b", "site_c"]
    assert sum(f.stat().st_size for f in demo_study_path().rglob("*")) < 1_000_000
