"""`privmed demo`: the main job on the embedded default.

Takes the shipped synthetic study (3 sites x 4 chest phantoms) and the shipped small
classifier, runs secure inference through the three roles over mutual TLS on loopback (one
session, one image per batch), runs the same model in plaintext with onnxruntime, and prints
per image and finding what the data owner received beside the plaintext probability, then the
cost per image (time, bytes, rounds). Exits non-zero if any secure probability differs from
plaintext by more than the tolerance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

TOLERANCE = 1e-3  # in probability; f = 16 fractional bits give errors ~1e-5 on this model


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="secure vs plaintext inference on the shipped synthetic study (about a minute)")
    p.add_argument("--model", type=Path, help="ONNX classifier (default: the shipped chest_smallcnn.onnx)")
    p.add_argument("--data", type=Path, help="study folder (default: the shipped demo study)")
    p.add_argument("--limit", type=int, help="only the first N images")
    p.add_argument("--stats", type=Path, help="write the session stats JSON here")
    p.add_argument("--full", action="store_true",
                   help="then the real job: DenseNet-121 224x224 on a real chest radiograph (RG1) and a U-Net "
                        "on a real head CT series, secure vs plaintext (several minutes)")  # fmt: skip
    p.set_defaults(func=cmd_demo)


def shipped_model() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "models" / "chest_smallcnn.onnx"


def cmd_demo(args: argparse.Namespace) -> int:

    from privmed.cli.progress import LayerProgress, human_bytes, summary_table
    from privmed.data.datasets import demo_study_path, load_study
    from privmed.data.preprocess import Preprocess, load_for_model, sidecar_path
    from privmed.engines import ModelCard, PlaintextEngine, SecureEngine
    from privmed.errors import InputError

    model = args.model or shipped_model()
    if not model.exists():
        raise InputError(f"{model}: model not found")
    study = load_study(args.data or demo_study_path())
    records = study.records[: args.limit] if args.limit else study.records
    if not records:
        raise InputError(f"{study.root}: no images in the study")
    pre = Preprocess.load(sidecar_path(model))
    x = np.concatenate([load_for_model(r.path, pre) for r in records]).astype(np.float32)
    metrics = model.with_suffix(".metrics.json")
    findings = json.loads(metrics.read_text()).get("findings", study.findings) if metrics.exists() else study.findings

    card = ModelCard.read(model)
    plaintext = PlaintextEngine()
    plaintext.run(card, x[:1])  # warm-up
    plain_run = plaintext.run(card, x, default_chunk=1)
    plain = plain_run.outputs
    plain_s = float(np.median([b.time_s for b in plain_run.stats.batches]))

    print(f"privmed demo: {len(records)} images from {len(study.sites())} sites, model {model.name} "
          f"(input {tuple(x.shape[1:])}, {len(findings)} findings)")
    print("secure inference: data owner (images) + model owner (weights) + dealer, three processes, mutual TLS 1.3 on 127.0.0.1")
    result = SecureEngine(chunk=1, progress=LayerProgress(label="secure inference")).run(card, x)
    secure = result.outputs
    diff = np.abs(secure - plain)

    head = f"{'image':<18}{'site':<8}" + "".join(f"{f[:12]:>26}" for f in findings)
    print("\n" + head)
    print(f"{'':<26}" + "".join(f"{'secure / plain  (label)':>26}" for _ in findings))
    for i, r in enumerate(records):
        cells = []
        for j in range(len(findings)):
            lab = r.labels[j] if j < len(r.labels) else np.nan
            mark = "-" if np.isnan(lab) else str(int(lab))
            cells.append(f"{secure[i, j]:>9.4f} / {plain[i, j]:.4f}  ({mark})")
        print(f"{r.image_id[:17]:<18}{r.site:<8}" + "".join(f"{c:>26}" for c in cells))
    st = result.stats
    print(f"plan {st.plan.fingerprint if st.plan else '?'} (pin it with --expect-plan)")
    per = st.batches
    t = np.array([b.time_s for b in per])
    by = np.array([b.bytes for b in per])
    print(f"\nmax |secure - plaintext| = {diff.max():.2e} (tolerance {TOLERANCE:g}); mean {diff.mean():.2e}")
    print(f"per image, secure: {np.median(t):.3f} s median (max {t.max():.3f} s), {human_bytes(float(np.median(by)))}, "
          f"{per[0].rounds} rounds | plaintext onnxruntime: {plain_s * 1000:.2f} ms (no protection)")
    print(summary_table(st, top=5))
    if args.stats:
        args.stats.write_text(json.dumps(st.to_dict(), indent=1))
    if diff.max() > TOLERANCE:
        print(f"privmed: error: secure output differs from plaintext by {diff.max():.2e} > {TOLERANCE:g}")
        return 1
    if args.full:
        from privmed.cli.demo_full import run_full

        return run_full()
    return 0
