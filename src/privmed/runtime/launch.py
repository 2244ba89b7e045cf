"""``run_local_session``: a secure session on this machine, the caller being the data owner.

The process that calls it *is* the data owner (the hospital's side: it holds the image and
receives the output); it starts the model owner and the dealer as two OS processes
(``python -m privmed.cli.main party --role ...``) and talks to them TCP + mutual TLS 1.3 on
127.0.0.1 with OS-assigned ports and an ephemeral CA made for the run, exactly as a deployment
with three hosts would (only the addresses differ). Progress comes straight from the data
owner's walk; the two children write their stats JSON; when the session fails, the data
owner's error and each child's one-line error are raised together, the root cause first.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from privmed.compiler import onnx_front
from privmed.compiler.lower import check_supported
from privmed.crypto.certs import ephemeral_session
from privmed.errors import InputError, PeerError, PrivmedError
from privmed.runtime.config import Endpoint, write_config
from privmed.runtime.memory import MALLOC_ENV
from privmed.runtime.stats import SessionStats, merge_roles

log = logging.getLogger(__name__)


@dataclass
class SessionResult:
    outputs: np.ndarray  # what the data owner learned (final Sigmoid/Softmax applied in clear)
    stats: SessionStats


def check_input(model_path: Path, x: np.ndarray, input_shape: list[int] | None = None) -> onnx_front.OnnxGraph:
    """Fail fast, before any process starts: bad model file, unsupported ops, wrong input."""
    graph = onnx_front.load(Path(model_path), input_shape)
    check_supported(graph, Path(model_path))
    if not isinstance(x, np.ndarray) or x.dtype.kind != "f":
        raise InputError(f"input must be a float32 array, got {getattr(x, 'dtype', type(x))}")
    if list(x.shape[1:]) != list(graph.input_shape) or x.ndim != len(graph.input_shape) + 1:
        want = ", ".join(map(str, graph.input_shape))
        raise InputError(f"input shape {tuple(x.shape)} does not match the model input (N, {want}) of {model_path}")
    if not np.all(np.isfinite(x)):
        raise InputError("input contains NaN or infinite values")
    return graph


def _first_error(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("privmed: error:"):
            return ln[len("privmed: error:") :].strip()
    return lines[-1] if lines else "exited without a message"


def run_local_session(
    model_path: Path,
    inputs: np.ndarray,
    *,
    timeout_s: float = 120.0,
    workdir: Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    calibration: Path | None = None,
    frac_bits: int | None = None,
    input_shape: list[int] | None = None,
    chunk: int | None = None,
    stall_s: float | None = None,
    expect_plan: str | None = None,
) -> SessionResult:
    """Run one secure-inference session of ``model_path`` on ``inputs`` (N, ...) float32,
    this process acting as the data owner.

    With ``chunk`` the N inputs stream through the session in batches of that size (memory
    stays bounded by one batch; the masked weights are sent once for the whole session).

    Every receive of every role has its own deadline (``timeout_s``). On top, a watchdog stops
    the session when the data owner finishes no layer for ``stall_s`` seconds (default
    ``20 * timeout_s``), e.g. a child stuck without waiting on a receive. It is a watchdog on
    progress, not a limit on the session's length: a volume of hundreds of slices may run for
    hours.

    ``expect_plan``: the data owner refuses any plan whose SHA-256 fingerprint differs (the
    fingerprint of the accepted plan is ``stats.plan.fingerprint``).
    """
    from privmed.runtime.config import load_config
    from privmed.runtime.party import run_role

    x = np.ascontiguousarray(inputs, dtype=np.float32) if isinstance(inputs, np.ndarray) and inputs.dtype.kind == "f" else inputs
    check_input(Path(model_path), x, input_shape)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="privmed-", dir=workdir) as tmp_s:
        tmp = Path(tmp_s)
        ids = ephemeral_session(tmp / "certs")
        eps = {r: Endpoint("127.0.0.1", 0, tmp / f"{r}.port") for r in ("model-owner", "dealer")}
        write_config(tmp / "session.toml", ids, eps, timeout_s, connect_timeout_s=min(60.0, timeout_s))
        children = {"dealer": [], "model-owner": model_owner_args(model_path, calibration, frac_bits, input_shape)}

        def data_owner(relay: Callable[..., None]) -> tuple[np.ndarray | None, dict[str, Any]]:
            return run_role("data-owner", load_config(tmp / "session.toml"), x=x, chunk=chunk, progress=relay, expect_plan=expect_plan)

        out, stats = run_with_children(tmp, [], children, data_owner, progress, timeout_s, stall_s)
    return SessionResult(out, merge_roles(stats, time.perf_counter() - t0))


def model_owner_args(model_path: Path, calibration: Path | None, frac_bits: int | None, input_shape: list[int] | None) -> list[str]:
    """``privmed party`` options of a local model owner."""
    return (["--model", str(model_path)] + (["--calibration", str(calibration)] if calibration else [])
            + (["--frac-bits", str(frac_bits)] if frac_bits else [])
            + (["--input-shape", ",".join(map(str, input_shape))] if input_shape else []))  # fmt: skip


# A local dealer yields the cores to the computing parties: its work is input-independent and
# streams ahead of them (up to the channel's buffer), so at niceness 10 it runs in the gaps in
# which the data owner or the model owner waits for a round, instead of delaying their next
# step (measured on 2 cores, DenseNet-121 224x224: 4.74 -> 4.37 s; README, "Measured figures").
DEALER_NICE = 10


def _yield_cores(pid: int) -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, pid, max(os.getpriority(os.PRIO_PROCESS, 0), DEALER_NICE))
    except OSError as exc:  # the session runs the same either way, at most a little slower
        log.debug("dealer priority unchanged: %s", exc)


def run_with_children(
    tmp: Path,
    party_options: list[str],
    children: dict[str, list[str]],
    data_owner: Callable[[Callable[..., None]], tuple[np.ndarray | None, dict[str, Any]]],
    progress: Callable[[dict[str, Any]], None] | None,
    timeout_s: float,
    stall_s: float | None,
) -> tuple[np.ndarray, dict[str, dict[str, Any]]]:
    """Start each of ``children`` (role -> ``privmed party`` options; ``party_options`` for all)
    with ``tmp/session.toml``, run ``data_owner(progress relay)`` in this process, and return
    (the output, every role's stats). A failure anywhere is raised as one line, root cause first.
    """
    base = [sys.executable, "-m", "privmed.cli.main", "party", *party_options, "--config", str(tmp / "session.toml")]
    # the roles share the machine: one BLAS thread each avoids spinning threads
    # fighting over the cores (measured: 56 -> 34 CPU-seconds for DenseNet-121 on 2 cores)
    threads = os.environ.get("PRIVMED_BLAS_THREADS", "1")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, **MALLOC_ENV}
    procs = {
        role: subprocess.Popen(
            base + ["--role", role, "--stats", str(tmp / f"{role}.stats.json")] + options,
            stdout=subprocess.DEVNULL,
            stderr=open(tmp / f"{role}.err", "wb"),  # noqa: SIM115 - closed with the process
            env=env,
            start_new_session=True,
        )
        for role, options in children.items()
    }
    if "dealer" in procs:
        _yield_cores(procs["dealer"].pid)
    watchdog = Watchdog(stall_s if stall_s is not None else timeout_s * 20, lambda: _kill(procs))
    try:
        with _blas_threads(int(threads)):  # as the children: no BLAS threads fighting over the cores
            out, do_stats = data_owner(_relay(progress, watchdog))
    except PrivmedError as exc:
        raise _session_error(exc, procs, tmp, watchdog) from None
    finally:
        watchdog.stop()
        try:
            for p in procs.values():
                p.wait(timeout=timeout_s)
        finally:
            _kill(procs)
    codes = {r: p.returncode for r, p in procs.items()}
    if any(codes.values()):
        errs = {r: _first_error((tmp / f"{r}.err").read_text(errors="replace")) for r, c in codes.items() if c}
        raise PeerError("; ".join(f"{r}: {e}" for r, e in errs.items()))
    stats = {r: json.loads((tmp / f"{r}.stats.json").read_text()) for r in procs}
    stats["data-owner"] = do_stats
    assert out is not None
    return out, stats


@contextlib.contextmanager
def _blas_threads(n: int) -> Iterator[None]:
    """Limit this process's BLAS pools to ``n`` threads while it is the data owner: the three
    roles share the machine, and a multi-threaded GEMM here would fight the two children
    (measured on DenseNet-121 at 224x224, 2 cores: 28.9 s online with OpenBLAS's 2 threads in
    the data owner, 18.1 s with one thread per role)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a dependency; without it the pools stay as they are
        yield
        return
    with threadpool_limits(limits=max(1, n), user_api="blas"):
        yield


class Watchdog:
    """Calls ``on_stall`` once when ``tick`` has not been called for ``stall_s`` seconds."""

    def __init__(self, stall_s: float, on_stall: Callable[[], None]) -> None:
        self.stall_s = stall_s
        self.stalled = False
        self._last = time.monotonic()
        self._done = threading.Event()
        self._on_stall = on_stall
        self._thread = threading.Thread(target=self._watch, name="privmed-watchdog", daemon=True)
        self._thread.start()

    def tick(self) -> None:
        self._last = time.monotonic()

    def stop(self) -> None:
        self._done.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._done.wait(min(0.2, self.stall_s / 4)):
            if time.monotonic() - self._last > self.stall_s:
                self.stalled = True
                self._on_stall()
                return


def _relay(progress: Callable[[dict[str, Any]], None] | None, watchdog: Watchdog) -> Callable[..., None]:
    """The data owner's per-layer callback: feed the watchdog, pass an event to ``progress``."""

    def emit(done: int, total: int, node: Any, batch: int = 0, batches: int | None = None) -> None:
        watchdog.tick()
        if progress:
            progress({"done": done, "total": total, "op": node.op, "onnx": node.attrs.get("onnx", ""), "batch": batch, "batches": batches})

    return emit


def _kill(procs: dict[str, subprocess.Popen]) -> None:
    for p in procs.values():
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def _session_error(exc: PrivmedError, procs: dict[str, subprocess.Popen], tmp: Path, watchdog: Watchdog) -> PeerError:
    """One line: the root cause first (the party whose error is not a consequence of another
    party's abort or disconnection), then every other party's view."""
    if watchdog.stalled:
        return PeerError(f"the session made no progress for {watchdog.stall_s:.0f} s (no layer finished); stopped")
    for p in procs.values():  # the children see the data owner's abort and exit at once
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    _kill(procs)
    errs = {"data-owner": str(exc)}
    errs.update({r: _first_error((tmp / f"{r}.err").read_text(errors="replace")) for r, p in procs.items() if p.returncode})
    for r in procs:  # full stderr of every role with `privmed -v`
        log.debug("%s stderr:\n%s", r, (tmp / f"{r}.err").read_text(errors="replace"))
    primary = next((r for r, e in errs.items() if "aborted the session" not in e and "lost connection" not in e), "data-owner")
    return PeerError(f"{primary}: {errs[primary]}" + "".join(f" | {r}: {e}" for r, e in errs.items() if r != primary))
