"""The model under validation, its preprocessing and the study's images, one image at a time.

:class:`StudyModel` reads the model's card once (``privmed.engines.ModelCard``), its
preprocessing sidecar and the study records, and runs the plaintext arm with
``privmed.engines.PlaintextEngine``; :func:`prepare_image` turns one record into the model's input and runs the
plaintext arm on it. The secure arm (one session for a group of prepared images) is the
runner's (:mod:`privmed.evaluate.runner`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privmed.engines import ModelCard, PlaintextEngine, sha256_file  # noqa: F401 - sha256_file for the runner
from privmed.errors import InputError, ModelError
from privmed.evaluate.masks import nearest_resize
from privmed.evaluate.store import ImageResult

log = logging.getLogger(__name__)


def output_kind(model_path: Path) -> str:
    """ "probability" if the graph's output comes from Sigmoid/Softmax, else "logit"."""
    return ModelCard.read(model_path).output_kind


def model_labels(model_path: Path) -> list[str] | None:
    """Finding names stored in the ONNX metadata ``privmed.labels`` (JSON list), if any."""
    labels = ModelCard.read(model_path).labels
    return list(labels) if labels is not None else None


class StudyModel:
    """The model, its preprocessing and the study records, ready to process images."""

    def __init__(self, model_path: Path, data_dir: Path, pseudonyms: Any = None) -> None:
        """``pseudonyms``: a ``privmed.data.pseudonym.Pseudonymizer`` (default: the data
        owner's key from ``default_key_path``). Records are named by it from here on."""
        from privmed.data.datasets import load_study
        from privmed.data.preprocess import Preprocess, sidecar_path
        from privmed.data.pseudonym import Pseudonymizer, load_or_create_key, pseudonymise_study

        if not model_path.is_file():
            raise InputError(f"{model_path}: model file not found")
        pre_path = sidecar_path(model_path)
        if not pre_path.is_file():
            raise InputError(
                f"{pre_path}: preprocessing description not found (expected next to the model)"
            )
        self.preprocess = Preprocess.load(pre_path)
        self.study = load_study(data_dir)
        # nothing written about an image (store, report, logs) may name the patient or the file
        self.pseudonyms = pseudonyms if pseudonyms is not None else Pseudonymizer(load_or_create_key())
        pseudonymise_study(self.study, self.pseudonyms)
        self.card = ModelCard.read(model_path)
        self.plaintext = PlaintextEngine(threads=1)  # one thread: leave the cores to the secure parties
        self.plaintext.session(self.card)  # an unloadable model fails here, before any image
        out_shape = [None, *self.card.output_shape]
        if len(out_shape) == 2 and isinstance(out_shape[1], int) and out_shape[1] < 0:
            out_shape[1] = None
        self.findings = list(self.card.labels) if self.card.labels else list(self.study.findings)
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


@dataclass
class Prepared:
    """One image after the plaintext arm: its row so far and, if that went well, its model input.

    ``model_input`` is None when preprocessing or plaintext inference failed; ``result`` is
    then a finished ``error`` row and the image takes no part in a secure session.
    """

    result: ImageResult
    model_input: np.ndarray | None


def prepare_image(study: StudyModel, record: Any, run_id: str) -> Prepared:
    """Preprocess ``record``, run the model in clear on it and read its ground-truth mask.

    Every failure except ModelError becomes an ``error`` row naming the stage that failed,
    exactly as one image of a study should: one bad file must not stop the others.
    """
    result = ImageResult(site=str(record.site), image_id=str(record.image_id), status="error",
                         path="", labels=study.labels_for(record),  # the path may name the patient
                         started_at=time.time(), run_id=run_id)  # fmt: skip
    stage = "preprocess"
    try:
        x = np.ascontiguousarray(study.model_input(record), dtype=np.float32)
        stage = "plaintext inference"
        t0 = time.perf_counter()
        plain = study.plaintext.run(study.card, x).outputs
        result.plain_s = time.perf_counter() - t0
        result.plain_output = np.asarray(plain, dtype=np.float32)
        if not study.is_classifier and getattr(record, "mask_path", None) is not None:
            stage = "ground-truth mask"
            truth, _ = study.study.read_mask(record)
            result.truth_mask = nearest_resize(truth, result.plain_output.shape[2:])
    except ModelError:
        raise
    except Exception as exc:  # one bad image must not stop the study; record why it failed
        fail(result, stage, exc, scrub=study.pseudonyms.scrub)
        return Prepared(result, None)
    return Prepared(result, x)


def fail(result: ImageResult, stage: str, exc: BaseException, scrub: Callable[[str], str] | None = None) -> None:
    """Make ``result`` a finished ``error`` row: ``"<stage>: <Exception>: <first line>"``.

    ``scrub`` replaces paths and names in the message by pseudonyms before it is stored or logged.
    """
    result.status = "error"
    message = f"{stage}: {type(exc).__name__}: {exc}".splitlines()[0]
    result.error = (scrub(message) if scrub is not None else message)[:500]
    result.finished_at = time.time()
    log.warning("%s/%s skipped: %s", result.site, result.image_id, result.error)
