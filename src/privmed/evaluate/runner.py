"""Run a validation study: plaintext and secure inference on every image, stored as it finishes.

One call of :func:`run_validation` does, for the images of the study not yet in the results
database, in groups of up to ``images_per_session``: load and preprocess each image exactly
as the model expects and run the ONNX model on it in clear with onnxruntime; then run the
same model securely on the group's good images in ONE session (the three parties as
separate processes; the masked weights travel once and the inputs stream through one per
batch); then write each image's outputs and its share of the session's costs in its own
transaction. ``workers`` groups run at once in threads (each session is its own set of
processes, so the GIL is not the limit); the calling thread is the only one that writes to
the database.

Why groups: a session's one-off part (three process starts, an ephemeral CA, compiling the
model, TLS handshakes, the masked weights) cost ~1.5 s against ~0.05-0.3 s online per image
for the shipped small model, so one session per image spent most of its time starting up.
How a session's cost is shared out over its images: :func:`privmed.evaluate.costs.split_session_costs`.

Not a deployment: the plaintext arm needs the model and the images on the same machine, so
a validation study is run where both may be seen together (the vendor's test set, or a
hospital that holds the model under agreement). Its purpose is to show that the secure
computation is faithful; in deployment ``privmed infer`` runs the parties on separate hosts.

Which failures skip an image and which stop the study: an image that cannot be read or
preprocessed is recorded as ``error`` and left out of its group's session. If a group's
session fails or times out, its images are run again one session each, so one image that
breaks a session cannot take the others with it; an image whose own session fails is
recorded as ``error``. The study goes on (``retry_errors`` runs those again later). A
``ModelError`` (the model cannot be compiled for secure inference) is the same for every
image and stops the study, and so do ``max_consecutive_failures`` failures in a row, which
almost always mean a broken setup.

Two parties (``parties=2``): no dealer; with ``store`` (``--store DIR``, made by ``privmed
validate --parties 2 --precompute N``) each image's batch runs on one precomputed set when
one matches, else computes its offline phase inline (``privmed.runtime.twoparty_store``);
one session at a time per store, so ``workers`` must be 1. ``RunSummary.phases`` sums the
run's offline and online costs and the sets consumed; each image's row has its own offline and
online time and bytes (``split_session_costs``).

Crash safety: a group's results are stored only once its session has finished, one row per
transaction, so a process killed mid-group loses at most that group's unstored work, and
the rerun runs exactly the images without a row.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import math
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from privmed.engines import CompileOptions, ModelCard, SecureEngine
from privmed.errors import InputError, ModelError, PrivmedError
from privmed.evaluate.costs import PhaseTotals, split_session_costs
from privmed.evaluate.store import ImageResult, ResultStore
from privmed.evaluate.study import (
    Prepared,
    StudyModel,
    fail,
    prepare_image,
)
from privmed.runtime.stats import SessionStats

log = logging.getLogger(__name__)

# (model_path, inputs (N, ...) float32) -> (outputs (N, ...) float32, the session's costs;
# ``batches`` may be empty for an engine that does not report them)
SecureInfer = Callable[[Path, np.ndarray], tuple[np.ndarray, SessionStats]]


@dataclass(frozen=True)
class ValidateOptions:
    """Knobs of a validation run (statistics knobs are stored for the report).

    ``images_per_session``: up to this many images share one secure session (1 = one
    session per image); see :func:`group_sizes` for how the images are split.
    """

    workers: int = 1
    limit: int | None = None
    timeout_s: float = 120.0
    retry_errors: bool = False
    margin: float = 0.01
    threshold: float = 0.5
    max_consecutive_failures: int = 10
    images_per_session: int = 16
    parties: int = 3  # 2: no dealer (privmed.runtime.twoparty_launch)
    expect_plan: str | None = None  # SHA-256 of the only plan the data owner accepts
    compile: CompileOptions = CompileOptions()  # what infer deploys: frac bits, calibration
    store: Path | None = None  # parties 2: precomputed offline material (one set per image, privmed.runtime.twoparty_store)
    ot_engine: str | None = None  # parties 2: "ferret" | "iknp" (--ot-engine); None: the session default


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
    phases: PhaseTotals | None = None  # two parties: offline / online costs and stored sets consumed


def engine_secure_infer(card: ModelCard, engine: SecureEngine, plans: set[str] | None = None,
                        phases: PhaseTotals | None = None) -> SecureInfer:  # fmt: skip
    """The real secure inference (``privmed.engines.SecureEngine``) on the study's model card.

    Batches of one: the N inputs of a group go through one session one per batch, so the
    engine reports each image's own time, bytes and rounds in ``stats.batches``. Every
    accepted plan's fingerprint is added to ``plans``, every session's offline / online costs
    to ``phases``.
    """

    def run(model_path: Path, inputs: np.ndarray) -> tuple[np.ndarray, SessionStats]:
        if Path(model_path) != card.path:
            raise InputError(f"{model_path}: the engine was set up for {card.path}")
        done = engine.run(card, inputs, default_chunk=1)
        if plans is not None and done.stats.plan is not None:
            plans.add(done.stats.plan.fingerprint)
        if phases is not None:
            phases.add(done.stats)
        return np.asarray(done.outputs, dtype=np.float32), done.stats

    return run


def group_sizes(n_images: int, per_session: int, workers: int) -> list[int]:
    """Sizes of the groups ``n_images`` are run in: as few as allowed, near-equal, in order.

    ``ceil(n / per_session)`` groups, but at least one per worker while there are images for
    them (8 images, 2 workers: 4 + 4, not 8 + nothing), whose sizes differ by at most one
    (300 images at 16: 15 groups of 16 and 4 of 15, rather than 18 of 16 and one of 12).
    Fewer groups means fewer one-off session costs; equal groups keep the workers' last
    sessions about as long as each other.
    """
    if n_images <= 0:
        return []
    n_groups = max(math.ceil(n_images / per_session), min(workers, n_images))
    base, extra = divmod(n_images, n_groups)
    return [base + 1] * extra + [base] * (n_groups - extra)


def _secure_session(prepared: list[Prepared], model_path: Path, secure_infer: SecureInfer) -> None:
    """Run ``prepared`` (all with a model input) through one secure session; fill their rows.

    Raises whatever the session raised, or InputError if it returned outputs of the wrong
    shape; the rows are then left untouched.
    """
    x = np.concatenate([p.model_input for p in prepared if p.model_input is not None])
    t0 = time.perf_counter()
    secure, stats = secure_infer(model_path, x)
    wall_s = time.perf_counter() - t0
    secure = np.asarray(secure, dtype=np.float32)
    plain_shape = np.asarray(prepared[0].result.plain_output).shape
    if secure.shape != (len(prepared), *plain_shape[1:]):
        raise InputError(f"secure output shape {secure.shape} for {len(prepared)} images, "
                         f"plaintext {plain_shape} per image")  # fmt: skip
    finished = time.time()
    for i, (p, cost) in enumerate(zip(prepared, split_session_costs(stats, len(prepared), wall_s),
                                      strict=True)):  # fmt: skip
        r = p.result
        r.secure_output = secure[i : i + 1]
        r.secure_s, r.online_s, r.rounds = cost.secure_s, cost.online_s, cost.rounds
        r.bytes_by_role, r.cpu_s, r.peak_rss_mb = cost.bytes_by_role, cost.cpu_s, cost.peak_rss_mb
        r.offline_s, r.offline_bytes, r.online_bytes = cost.offline_s, cost.offline_bytes, cost.online_bytes
        r.session_images = len(prepared)
        r.status, r.error, r.finished_at = "ok", "", finished


def _process_group(
    study: StudyModel, records: list[Any], model_path: Path, secure_infer: SecureInfer, run_id: str
) -> list[ImageResult]:
    """Both inferences for a group of images; one row per image, in the group's order.

    Plaintext per image, then one secure session over the images that got through it; if
    that session fails (anything but ModelError), one session per image instead.
    """
    prepared = [prepare_image(study, record, run_id) for record in records]
    good = [p for p in prepared if p.model_input is not None]
    if len(good) > 1:
        try:
            _secure_session(good, model_path, secure_infer)
            good = []
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - retried image by image just below
            why = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            log.warning("secure session for %d images failed (%s); running them one session each",
                        len(good), why)  # fmt: skip
    for p in good:
        try:
            _secure_session([p], model_path, secure_infer)
        except ModelError:
            raise
        except Exception as exc:  # one bad image must not stop the study; record why it failed
            fail(p.result, "secure inference", exc)
    return [p.result for p in prepared]


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
    if options.images_per_session < 1:
        raise InputError(f"--per-session: expected at least 1, got {options.images_per_session}")
    if options.store is not None and options.workers > 1:  # a store serves one session at a time (its lock)
        raise InputError(f"--store: a store serves one session at a time; use --workers 1, got {options.workers}")
    model_path = Path(model_path).resolve()
    study = StudyModel(model_path, Path(data_dir))
    plans: set[str] = set()
    engine = SecureEngine(chunk=1, timeout_s=options.timeout_s, compile=options.compile, expect_plan=options.expect_plan,
                          parties=options.parties, store=options.store, ot_engine=options.ot_engine)  # fmt: skip
    phases = PhaseTotals()
    secure_infer = secure_infer or engine_secure_infer(study.card, engine, plans, phases)
    records = list(study.study.records)
    if options.limit is not None:
        records = records[: max(0, options.limit)]
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    with ResultStore.open(out_dir) as store:
        store.check_or_set_meta({
            "model_sha256": study.card.sha256,
            "pseudonym_key_id": study.pseudonyms.key_id,  # checked first: another key renames everything
            # a folder name may name a patient: the study folder by pseudonym, like its images
            "data_dir": study.pseudonyms.of(f"dir:{Path(data_dir).resolve().as_posix()}", "study"),
            "findings": study.findings,
        })  # fmt: skip
        store.set_meta({
            "model_path": str(model_path), "output_kind": study.card.output_kind,
            "frac_bits": options.compile.frac_bits, "calibration": options.compile.calibration.name if options.compile.calibration else "",
            "margin": options.margin, "threshold": options.threshold,
            "n_images_study": len(study.study.records), "workers": options.workers,
            "images_per_session": options.images_per_session,
            "data_skipped": [f"{path}: {why}" for path, why in study.study.skipped],
        })  # fmt: skip
        done_keys = store.finished_keys(include_errors=not options.retry_errors)
        todo = [r for r in records if (str(r.site), str(r.image_id)) not in done_keys]
        already = len(records) - len(todo)
        log.info("%d images, %d already stored, %d to run", len(records), already, len(todo))
        try:
            run = _run_pool(study, todo, already, len(records), model_path, secure_infer, run_id,
                            store, options, progress)  # fmt: skip
            return replace(run, phases=phases) if phases.sessions else run
        finally:
            if plans:  # the plan(s) the data owner accepted in this run
                earlier = set(store.meta().get("plan_fingerprints", []))
                store.set_meta({"plan_fingerprints": sorted(earlier | plans)})


def _run_pool(
    study: StudyModel, todo: list[Any], already: int, total: int, model_path: Path,
    secure_infer: SecureInfer, run_id: str, store: ResultStore, options: ValidateOptions,
    progress: Callable[[Progress], None] | None,
) -> RunSummary:  # fmt: skip
    """Keep ``workers`` groups in flight; store each result from this (the only writer) thread."""
    t_start = time.perf_counter()
    ok = failed = consecutive = 0
    in_flight: set[cf.Future[list[ImageResult]]] = set()  # submitted and not yet stored
    ready: collections.deque[ImageResult] = collections.deque()  # computed, not yet stored
    records = iter(todo)
    groups = iter(
        [[next(records) for _ in range(size)]
         for size in group_sizes(len(todo), options.images_per_session, options.workers)]
    )  # fmt: skip

    def submit_next() -> None:
        group = next(groups, None)
        if group is not None:
            in_flight.add(
                pool.submit(_process_group, study, group, model_path, secure_infer, run_id)
            )

    def store_one(result: ImageResult) -> None:
        nonlocal ok, failed, consecutive
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
                ready.extend(fut.result())
                while ready:
                    store_one(ready.popleft())
                submit_next()
            if fatal:
                fatal[0].result()  # raises the worker's exception here, in the caller's thread
    finally:
        # Interrupted (Ctrl-C, ModelError, too many failures): let running sessions finish and
        # keep what they and the group being stored computed; groups not yet started are
        # simply run next time.
        for fut in in_flight:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        for fut in in_flight:
            if not fut.cancelled() and fut.exception() is None:
                ready.extend(fut.result())
        for result in ready:
            try:
                store.put(result)
            except sqlite3.Error as exc:  # do not mask the exception that got us here
                log.error("could not store %s: %s", result.image_id, exc)
    return RunSummary(total, already, ok + failed, ok, failed, time.perf_counter() - t_start)
