"""Shared pieces of the validate tests: a tiny study, a tiny model, a stand-in secure engine.

No tests here. ``InsecureTestPerturbation`` stands in for the secure engine where a test
exercises the bookkeeping (resume, failures, workers) and not the cryptography; it exists
only in tests and says in its name that it protects nothing.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from privmed.runtime.stats import SessionStats

FINDINGS = ["opacity", "nodule", "effusion", "cardiomegaly"]
SIDE = 32


def tiny_classifier_onnx(
    path: Path, side: int = SIDE, n_out: int = len(FINDINGS), seed: int = 0
) -> Path:
    """Conv(s2)-ReLU-Conv(s2)-ReLU-GlobalAveragePool-Gemm-Sigmoid with seeded random weights.

    Built with onnx.helper (no torch import, well under a second). Labels go in metadata.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.normal(scale=0.5, size=(4, 1, 3, 3)), "b1": rng.normal(scale=0.1, size=4),
        "w2": rng.normal(scale=0.3, size=(8, 4, 3, 3)), "b2": rng.normal(scale=0.1, size=8),
        "w3": rng.normal(scale=0.5, size=(n_out, 8)), "b3": rng.normal(scale=0.1, size=n_out),
    }  # fmt: skip
    conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], **conv),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], **conv),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("GlobalAveragePool", ["r2"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"], transB=1),
        helper.make_node("Sigmoid", ["logits"], ["output"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, side, side])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, n_out])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {"privmed.labels": json.dumps(FINDINGS[:n_out])})
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def tiny_segmenter_onnx(path: Path, n_classes: int, side: int, seed: int = 0) -> Path:
    """Conv3d(1 -> n_classes, 3x3x3, same padding) then Softmax over channels, seeded weights.

    The weights favour class c where the (min-max normalised) intensity is high for c > 0,
    so the masks are neither empty nor everything.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = rng.normal(scale=0.05, size=(n_classes, 1, 3, 3, 3))
    w[1:, 0, 1, 1, 1] += 6.0 * np.arange(1, n_classes)
    b = -3.0 * np.arange(n_classes) ** 1.5
    nodes = [
        helper.make_node(
            "Conv", ["input", "w", "b"], ["logits"], kernel_shape=[3, 3, 3], pads=[1] * 6
        ),
        helper.make_node("Softmax", ["logits"], ["output"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny_segmenter",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 1, side, side, side])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, n_classes, side, side, side])],
        [numpy_helper.from_array(w.astype(np.float32), "w"), numpy_helper.from_array(b.astype(np.float32), "b")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def make_study_and_model(
    root: Path, sites: int = 2, n_per_site: int = 4, seed: int = 0
) -> tuple[Path, Path]:
    """A synthetic chest study, a tiny ONNX classifier and its preprocessing sidecar."""
    from privmed.data.preprocess import Preprocess, sidecar_path
    from privmed.data.synth import synth_chest_study

    study = synth_chest_study(
        root / "study", sites=sites, n_per_site=n_per_site, size=SIDE, seed=seed
    )
    model = tiny_classifier_onnx(root / "model" / "chest.onnx", seed=seed)
    Preprocess(size=(SIDE, SIDE)).save(sidecar_path(model))
    return Path(study), model


class InsecureTestPerturbation:
    """TEST ONLY, NOT SECURE: onnxruntime in clear plus seeded noise, posing as the engine.

    Takes N inputs per call as the engine does (runs them one by one, since the tiny models
    have a fixed batch dimension of 1) and reports per-call stats that grow with N like a
    real session's totals (``bytes_sent``, ``rounds``, ``online_s``, ``cpu_s``) but, unlike
    the engine, no ``batches``. Counts calls and images, records each call's N, tracks how
    many calls run at once, sleeps ``sleep_s`` per image to look slow, and fails on chosen
    calls (1-based) or, with ``fail_groups``, on every call with more than one input.
    """

    def __init__(self, noise: float = 1e-4, sleep_s: float = 0.0, seed: int = 0,
                 fail_calls: dict[int, BaseException] | None = None,
                 fail_groups: BaseException | None = None) -> None:  # fmt: skip
        self.noise, self.sleep_s, self.fail_calls = noise, sleep_s, fail_calls or {}
        self.fail_groups = fail_groups
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.images = 0
        self.sizes: list[int] = []
        self.running = 0
        self.max_running = 0
        self._lock = threading.Lock()
        self._sessions: dict[str, Any] = {}

    def __call__(self, model_path: Path, x: np.ndarray) -> tuple[np.ndarray, SessionStats]:
        import onnxruntime as ort

        n = len(x)
        with self._lock:
            self.calls += 1
            self.images += n
            self.sizes.append(n)
            call = self.calls
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            if str(model_path) not in self._sessions:
                self._sessions[str(model_path)] = ort.InferenceSession(str(model_path))
        try:
            time.sleep(self.sleep_s * n)
            if call in self.fail_calls:
                raise self.fail_calls[call]
            if self.fail_groups is not None and n > 1:
                raise self.fail_groups
            sess = self._sessions[str(model_path)]
            plain = np.concatenate([sess.run(None, {"input": x[i : i + 1]})[0] for i in range(n)])
            with self._lock:
                noise = self.rng.normal(scale=self.noise, size=plain.shape)
            stats = SessionStats(wall_s=self.sleep_s * n, online_s=0.01 * n,
                                 bytes_sent={"data-owner": 100 * n, "model-owner": 200 * n, "dealer": 300 * n},
                                 rounds=15 * n, peak_rss_mb={"data-owner": 90.0, "model-owner": 91.0, "dealer": 92.0},
                                 cpu_s={"data-owner": 0.5 * n, "model-owner": 0.6 * n, "dealer": 0.4 * n})  # fmt: skip
            return (plain + noise).astype(np.float32), stats
        finally:
            with self._lock:
                self.running -= 1
