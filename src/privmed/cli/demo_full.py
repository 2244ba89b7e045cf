"""`privmed demo --full`: the real job after the embedded default, on real images at real sizes.

1. A MONAI DenseNet-121 (1 x 224 x 224 -> 14 ChestX-ray14 findings) on RG1, the real PA
   chest radiograph of pydicom-data (CR, MONOCHROME1, 15 bits, 1955 x 1841; read, inverted,
   windowed and resized by the model's preprocessing), securely and with onnxruntime.
2. privmed's 2-D U-Net (MONAI BasicUNet, 2 classes, 128 x 128 slices) on eight slices of the
   real InVesalius head CT (Debian ``invesalius-examples``), written as a DICOM series and
   read back by the series reader, securely and with onnxruntime, in one session. The U-Net
   is trained here (``privmed.segment.training.train_unet``, 3 epochs, under a minute) to
   find the head (HU > -500) on 25 other slices of the same CT, so its mask is not empty.

Nothing is downloaded and no trained model for these tasks ships with privmed: the
DenseNet-121 has seeded random weights (torch seed 0), so its outputs are not findings. What
the demo shows is the secure path on real data at real sizes, that its output is the
plaintext one (max |difference|, Dice), and what it costs.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CHESTXRAY14 = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
               "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia"]  # fmt: skip
CT_SLAB = slice(50, 58)  # eight axial slices through the ventricles
TOLERANCE = 1e-2  # probability; DenseNet-121 logits differ from onnxruntime by ~1e-3 (README)


def _densenet(folder: Path) -> Path:
    import json

    import torch

    from privmed.data.preprocess import Preprocess
    from privmed.models.export import export_onnx
    from privmed.models.zoo import build_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(build_model("densenet121", 1, len(CHESTXRAY14)), torch.nn.Sigmoid())
    pre = Preprocess(size=(224, 224), channels=1, normalize="zscore", window="file")
    meta = {"privmed.labels": json.dumps(CHESTXRAY14), "privmed.output": "probabilities"}
    return export_onnx(net, (1, 1, 224, 224), folder / "densenet121_224.onnx", pre, metadata=meta)


def _unet(folder: Path, hu: np.ndarray) -> Path:
    """privmed's 2-D U-Net trained briefly to find the head (HU > -500) on other slices of the CT."""
    import json

    from privmed.data.writers import write_nifti
    from privmed.segment.training import train_unet

    study = folder / "head"
    (study / "imagesTr").mkdir(parents=True)
    (study / "labelsTr").mkdir()
    training = []
    for name, part in (("tune", slice(60, 68)), ("lower", slice(20, 40, 2)), ("upper", slice(70, 100, 2))):
        write_nifti(study / "imagesTr" / f"{name}.nii.gz", hu[part], np.eye(4))
        write_nifti(study / "labelsTr" / f"{name}.nii.gz", (hu[part] > -500).astype(np.uint8), np.eye(4))
        training.append({"image": f"imagesTr/{name}.nii.gz", "label": f"labelsTr/{name}.nii.gz"})
    body = {"name": "head", "labels": {"0": "background", "1": "head"}, "training": training}
    (study / "dataset.json").write_text(json.dumps(body))
    t0 = time.perf_counter()
    trained = train_unet(study, "2d", folder / "unet2d_head.onnx", side=128, features=(8, 8, 16, 16, 32, 8),
                         epochs=3, batch_size=8, lr=1e-2, patience=0)  # fmt: skip
    print(f"U-Net trained on 25 other slices of the same CT in {time.perf_counter() - t0:.0f} s "
          f"({trained.epochs_run} epochs): Dice 'head' {trained.tune_dice['head']:.3f} on 8 more")
    return trained.onnx_path


def _plain(model: Path, x: np.ndarray) -> tuple[np.ndarray, float]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x[:1]})
    t0 = time.perf_counter()
    out = np.concatenate([sess.run(None, {name: x[i : i + 1]})[0] for i in range(len(x))])
    return out, (time.perf_counter() - t0) / len(x)


def radiograph(folder: Path) -> float:
    """DenseNet-121 224 on RG1; returns max |secure - plaintext|."""
    from pydicom.data import get_testdata_file

    from privmed.cli.progress import LayerProgress, summary_table
    from privmed.data.preprocess import Preprocess, load_for_model, sidecar_path
    from privmed.data.readers import read_image
    from privmed.runtime.launch import run_local_session

    found = get_testdata_file("RG1_UNCR.dcm")
    if found is None:
        print("\n[1/2] skipped: pydicom-data (RG1_UNCR.dcm) is not installed")
        return 0.0
    rg1 = Path(str(found))
    model = _densenet(folder)
    raw, meta = read_image(rg1)
    x = np.asarray(load_for_model(rg1, Preprocess.load(sidecar_path(model))), dtype=np.float32)
    print(f"\n[1/2] RG1 chest radiograph ({meta['modality']}, {meta['photometric']}, {meta['bits_stored']} bits, "
          f"{raw.shape[0]}x{raw.shape[1]}) -> DenseNet-121 {tuple(x.shape[1:])}, 14 findings, random weights (seed 0)")  # fmt: skip
    plain, plain_s = _plain(model, x)
    result = run_local_session(model, x, timeout_s=600.0, progress=LayerProgress(label="secure DenseNet-121"))
    diff = np.abs(result.outputs - plain)
    print(f"{'finding':<20}{'secure':>10}{'plain':>10}")
    for name, s, p in zip(CHESTXRAY14, result.outputs[0], plain[0], strict=True):
        print(f"{name:<20}{s:>10.4f}{p:>10.4f}")
    print(f"max |secure - plaintext| = {diff.max():.2e} (tolerance {TOLERANCE:g}) | onnxruntime {plain_s * 1000:.0f} ms (no protection)")
    print(f"plan {result.stats.plan.fingerprint if result.stats.plan else '?'}")
    print(summary_table(result.stats, top=3))
    return float(diff.max())


def head_ct(folder: Path) -> float:
    """U-Net on eight slices of the InVesalius head CT; returns 1 - min Dice (0 = identical)."""
    from privmed.cli.progress import LayerProgress
    from privmed.data.dicom_make import INVESALIUS_CRANIUM, read_invesalius, write_ct_series
    from privmed.engines import PlaintextEngine, SecureEngine
    from privmed.evaluate.masks import dice
    from privmed.segment import summary
    from privmed.segment.model import load_model
    from privmed.segment.pipeline import segment_volume
    from privmed.segment.volume import read_volume

    if not INVESALIUS_CRANIUM.is_file():
        print(f"\n[2/2] skipped: no real CT here ({INVESALIUS_CRANIUM}: apt-get install invesalius-examples)")
        return 0.0
    hu, spacing = read_invesalius()
    write_ct_series(folder / "head_ct", hu[CT_SLAB], spacing)
    volume = read_volume(folder / "head_ct")
    print(f"\n[2/2] InVesalius head CT, {volume.array.shape[0]} of {hu.shape[0]} slices as a DICOM series "
          f"{volume.array.shape} -> 2-D U-Net 128x128 for the head")  # fmt: skip
    model = load_model(_unet(folder, hu))
    engine = SecureEngine(chunk=4, timeout_s=600.0, progress=LayerProgress(label="secure U-Net"))
    secure = segment_volume(volume.array, model, engine, "2d")
    plain = segment_volume(volume.array, model, PlaintextEngine(), "2d")
    d = dice(secure.labels == 1, plain.labels == 1)
    costs = summary.cost_summary(secure.run.stats, secure.n_items, secure.prepared.unit)
    pcosts = summary.cost_summary(plain.run.stats, plain.n_items, plain.prepared.unit)
    print(f"secure mask: {100 * float((secure.labels == 1).mean()):.1f} % of voxels 'head' (plaintext "
          f"{100 * float((plain.labels == 1).mean()):.1f} %)")  # fmt: skip
    print(f"secure vs plaintext: Dice {d:.4f}, voxels differing {int((secure.labels != plain.labels).sum())} of "
          f"{secure.labels.size}, max |p - p_plain| {float(np.abs(secure.probabilities - plain.probabilities).max()):.2e}")  # fmt: skip
    print("\n".join(summary.format_costs(costs, "secure")))
    print(f"  plaintext onnxruntime: {pcosts['per_item']['time_s']:.4f} s per slice (no protection)")
    return 1.0 - d


def run_full() -> int:
    """Both parts; non-zero exit if secure and plaintext disagree beyond the tolerances."""
    t0 = time.perf_counter()
    print("\nprivmed demo --full: real images at real sizes (several minutes on 2 cores)")
    with tempfile.TemporaryDirectory(prefix="privmed-demo-") as tmp:
        worst = radiograph(Path(tmp))
        dice_gap = head_ct(Path(tmp))
    print(f"\ndemo --full done in {time.perf_counter() - t0:.0f} s")
    problems: list[Any] = []
    if worst > TOLERANCE:
        problems.append(f"DenseNet-121 secure output differs from plaintext by {worst:.2e} > {TOLERANCE:g}")
    if dice_gap > 0.01:
        problems.append(f"U-Net secure mask Dice {1 - dice_gap:.4f} < 0.99 against plaintext")
    for p in problems:
        print(f"privmed: error: {p}", file=sys.stderr)
    return 1 if problems else 0
