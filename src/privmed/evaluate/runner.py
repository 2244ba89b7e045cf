"""Run a validation study: plaintext and secure inference on every image, stored as it finishes.

One call of :func:`run_validation` does, for each image of the study not yet in the results
database: load and preprocess it exactly as the model expects, run the ONNX model in clear
with onnxruntime, run the same model securely (the three parties as separate processes),
and write both outputs with the costs in one transaction. ``workers`` sessions run at once
in threads (each session is its own set of processes, so the GIL is not the limit); the
calling thread is the only one that writes to the database.

Not a deployment: the plaintext arm needs the model and the images on the same machine, so
a validation study is run where both may be seen together (the vendor's test set, or a
hospital that holds the model under agreement). Its purpose is to show that the secure
computation is faithful; in deployment ``privmed infer`` runs the parties on separate hosts.

Which failures skip an image and which stop the study: an image that cannot be read or
preprocessed, or whose secure session fails or times out, is recorded as ``error`` and the
study goes on (``retry_errors`` runs those again later). A ``ModelError`` (the model cannot be
compiled for secure inference) is the same for every image and stops the study, and so do
``max_consecutive_failures`` failures in a row, which almost always mean a broken setup.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import InputError, ModelError, PrivmedError
from privmed.evaluate.masks import nearest_resize
from privmed.evaluate.store import ImageResult, ResultStore

log = logging.getLogger(__name__)

# (model_path, inputs (N, ...) float32) -> (outputs float32, stats dict as in SessionResult.stats)
SecureInfer = Callable[[Path, np.ndarray], tuple[np.ndarray, dict[str, Any]]]


@dataclass(frozen=True)
class ValidateOptions:
    """Knobs of a validation run (statistics knobs are stored for the report)."""

    workers: int = 1
    limit: int | None = None
    timeout_s: float = 120.0
    retry_errors: bool = False
    margin: float = 0.01
    threshold: float = 0.5
    max_consecutive_failures: int = 10


@dataclass(frozen=True)
class Progress:
    """State after one more image was stored; ``rate`` and ``eta_s`` count this run only."""

    done: int
    total: int
    failed: int
    elapsed_s: float
    rate: float
    eta_s: float
    last: ImageResult


@dataclass(frozen=True)
class RunSummary:
    """What one call of :func:`run_validation` did."""

    total: int
    already_done: int
    processed: int
    ok: int
    failed: int
    elapsed_s: float


def engine_secure_infer(timeout_s: float) -> SecureInfer:
    """The real secure inference: three parties over TLS on loopback (privmed.runtime)."""

    def run(model_path: Path, inputs: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        from privmed.runtime.launch import run_local_session

        result = run_local_session(model_path, inputs, timeout_s=timeout_s)
        return np.asarray(result.outputs, dtype=np.float32), dict(result.stats)

    return run


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def output_kind(model_path: Path) -> str:
    """ "probability" if the graph's output comes from Sigmoid/Softmax, else "logit"."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    out_name = graph.output[0].name
    for node in graph.node:
        if out_name in node.output:
            return "probability" if node.op_type in ("Sigmoid", "Softmax") else "logit"
    return "logit"


def model_labels(model_path: Path) -> list[str] | None:
    """Finding names stored in the ONNX metadata ``privmed.labels`` (JSON list), if any."""
    import json

    import onnx

    props = {
        p.key: p.value for p in onnx.load(str(model_path), load_external_data=False).metadata_props
    }
    if "privmed.labels" not in props:
        return None
    try:
        labels = json.loads(props["privmed.labels"])
    except json.JSONDecodeError as exc:
        raise ModelError(f"{model_path}: metadata privmed.labels is not JSON ({exc})") from exc
    return [str(x) for x in labels]


class _Study:
    """The model, its preprocessing and the study records, ready to process images."""

    def __init__(self, model_path: Path, data_dir: Path) -> None:
        import onnxruntime as ort

        from privmed.data.datasets import load_study
        from privmed.data.preprocess import Preprocess, sidecar_path

        if not model_path.is_file():
            raise InputError(f"{model_path}: model file not found")
        pre_path = sidecar_path(model_path)
        if not pre_path.is_file():
            raise InputError(
                f"{pre_path}: preprocessing description not found (expected next to the model)"
            )
        self.preprocess = Preprocess.load(pre_path)
        self.study = load_study(data_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1  # leave the cores to the secure parties
        try:
            self.session = ort.InferenceSession(
                str(model_path), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelError(f"{model_path}: onnxruntime cannot load the model ({exc})") from exc
        self.input_name = self.session.get_inputs()[0].name
        out_shape = self.session.get_outputs()[0].shape
        self.findings = model_labels(model_path) or list(self.study.findings)
        # Classifier: (N, F) output, one column per finding; map study label columns by name.
        self.is_classifier = len(out_shape) == 2
        if (
            self.is_classifier
            and isinstance(out_shape[1], int)
            and out_shape[1] != len(self.findings)
        ):
            raise InputError(
                f"{model_path}: expected {len(self.findings)} outputs (findings "
                f"{', '.join(self.findings)}), got output shape {out_shape}"
            )
        study_findings = list(self.study.findings)
        self.label_columns = [
            study_findings.index(f) if f in study_findings else None for f in self.findings
        ]

    def model_input(self, record: Any) -> np.ndarray:
        """The record's image preprocessed for the model: float32 ``(1, C, *spatial)``."""
        from privmed.data.preprocess import load_for_model

        if getattr(record, "array_key", None) is not None:  # a row of a MedMNIST .npz
            image, _ = self.study.read(record)
            return self.preprocess.apply(image)[None]
        return load_for_model(record.path, self.preprocess)

    def labels_for(self, record: Any) -> np.ndarray:
        """The record's labels in model output order; NaN for findings the study lacks."""
        labels = np.asarray(record.labels, dtype=np.float32)
        return np.array(
            [labels[c] if c is not None else np.nan for c in self.label_columns], np.float32
        )


def _process(
    study: _Study, record: Any, model_path: Path, secure_infer: SecureInfer, run_id: str
) -> ImageResult:
    """Both inferences for one image; every failure except ModelError becomes an error row."""
    result = ImageResult(site=str(record.site), image_id=str(record.image_id), status="error",
                         path=str(record.path), labels=study.labels_for(record),
                         started_at=time.time(), run_id=run_id)  # fmt: skip
    stage = "preprocess"
    try:
        x = np.ascontiguousarray(study.model_input(record), dtype=np.float32)
        stage = "plaintext inference"
        t0 = time.perf_counter()
        plain = study.session.run(None, {study.input_name: x})[0]
        result.plain_s = time.perf_counter() - t0
        result.plain_output = np.asarray(plain, dtype=np.float32)
        if not study.is_classifier and getattr(record, "mask_path", None) is not None:
            stage = "ground-truth mask"
            truth, _ = study.study.read_mask(record)
            result.truth_mask = nearest_resize(truth, result.plain_output.shape[2:])
        stage = "secure inference"
        t0 = time.perf_counter()
        secure, stats = secure_infer(model_path, x)
        result.secure_s = time.perf_counter() - t0
        secure = np.asarray(secure, dtype=np.float32)
        if secure.shape != result.plain_output.shape:
            raise InputError(
                f"secure output shape {secure.shape}, plaintext {result.plain_output.shape}"
            )
        result.secure_output = secure
        result.bytes_by_role = {
            str(k): int(v) for k, v in dict(stats.get("bytes_sent", {})).items()
        }
        result.rounds = int(stats["rounds"]) if stats.get("rounds") is not None else None
        result.peak_rss_mb = {
            str(k): float(v) for k, v in dict(stats.get("peak_rss_mb", {})).items()
        }
        result.cpu_s = {str(k): float(v) for k, v in dict(stats.get("cpu_s", {})).items()}
        if stats.get("online_s") is not None:
            result.online_s = float(stats["online_s"])
        result.status = "ok"
    except ModelError:
        raise
    except Exception as exc:  # one bad image must not stop the study; record why it failed
        result.error = f"{stage}: {type(exc).__name__}: {exc}".splitlines()[0][:500]
        log.warning("%s/%s skipped: %s", record.site, record.image_id, result.error)
    result.finished_at = time.time()
    return result


def run_validation(
    model_path: str | Path,
    data_dir: str | Path,
    out_dir: str | Path,
    options: ValidateOptions = ValidateOptions(),
    *,
    secure_infer: SecureInfer | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> RunSummary:
    """Validate ``model_path`` on the study in ``data_dir``, storing results in ``out_dir``.

    Images already stored are skipped (errors too, unless ``options.retry_errors``), so
    calling this again after an interruption finishes the study. ``secure_infer`` defaults
    to :func:`engine_secure_infer`; ``progress`` is called after every stored image.
    """
    if options.workers < 1:
        raise InputError(f"--workers: expected at least 1, got {options.workers}")
    model_path = Path(model_path).resolve()
    study = _Study(model_path, Path(data_dir))
    secure_infer = secure_infer or engine_secure_infer(options.timeout_s)
    records = list(study.study.records)
    if options.limit is not None:
        records = records[: max(0, options.limit)]
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    with ResultStore.open(out_dir) as store:
        store.check_or_set_meta({
            "model_sha256": sha256_file(model_path),
            "data_dir": str(Path(data_dir).resolve()),
            "findings": study.findings,
        })  # fmt: skip
        store.set_meta({
            "model_path": str(model_path), "output_kind": output_kind(model_path),
            "margin": options.margin, "threshold": options.threshold,
            "n_images_study": len(study.study.records), "workers": options.workers,
            "data_skipped": [f"{path}: {why}" for path, why in study.study.skipped],
        })  # fmt: skip
        done_keys = store.finished_keys(include_errors=not options.retry_errors)
        todo = [r for r in records if (str(r.site), str(r.image_id)) not in done_keys]
        already = len(records) - len(todo)
        log.info("%d images, %d already stored, %d to run", len(records), already, len(todo))
        return _run_pool(study, todo, already, len(records), model_path, secure_infer, run_id,
                         store, options, progress)  # fmt: skip


def _run_pool(
    study: _Study, todo: list[Any], already: int, total: int, model_path: Path,
    secure_infer: SecureInfer, run_id: str, store: ResultStore, options: ValidateOptions,
    progress: Callable[[Progress], None] | None,
) -> RunSummary:  # fmt: skip
    """Keep ``workers`` images in flight; store each result from this (the only writer) thread."""
    t_start = time.perf_counter()
    ok = failed = consecutive = 0
    in_flight: set[cf.Future[ImageResult]] = set()  # submitted and not yet stored
    queue = iter(todo)

    def submit_next() -> None:
        record = next(queue, None)
        if record is not None:
            in_flight.add(pool.submit(_process, study, record, model_path, secure_infer, run_id))

    pool = cf.ThreadPoolExecutor(max_workers=options.workers, thread_name_prefix="validate")
    try:
        for _ in range(options.workers):
            submit_next()
        while in_flight:
            finished, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
            fatal = []
            for fut in finished:
                in_flight.discard(fut)
                if fut.exception() is not None:
                    fatal.append(fut)  # ModelError: raised below, after storing the others
                    continue
                result = fut.result()
                store.put(result)
                if result.status == "ok":
                    ok, consecutive = ok + 1, 0
                else:
                    failed, consecutive = failed + 1, consecutive + 1
                if consecutive >= options.max_consecutive_failures:
                    raise PrivmedError(
                        f"stopped after {consecutive} failed images in a row; last "
                        f"{result.site}/{result.image_id}: {result.error}"
                    )
                if progress is not None:
                    elapsed = time.perf_counter() - t_start
                    n_run = ok + failed
                    rate = n_run / elapsed if elapsed > 0 else float("nan")
                    remaining = len(todo) - n_run
                    progress(Progress(already + n_run, total, failed, elapsed, rate,
                                      remaining / rate if rate > 0 else float("nan"), result))  # fmt: skip
                submit_next()
            if fatal:
                fatal[0].result()  # raises the worker's exception here, in the caller's thread
    finally:
        # Interrupted (Ctrl-C, ModelError, too many failures): let running sessions finish and
        # keep what they computed; images not yet started are simply run next time.
        for fut in in_flight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in in_flight:
            if not fut.cancelled() and fut.exception() is None:
                try:
                    store.put(fut.result())
                except sqlite3.Error as exc:  # do not mask the exception that got us here
                    log.error("could not store %s: %s", fut.result().image_id, exc)
    return RunSummary(total, already, ok + failed, ok, failed, time.perf_counter() - t_start)
