"""One secure engine and one plaintext engine for every job, and the model card they share.

``ModelCard`` is what the data owner's side knows of a model, read once per run from the ONNX
file: per-sample input and output shapes, the final activation (applied in clear), the finding
names, the preprocessing description next to it, the file's SHA-256. ``SecureEngine`` runs a
batch of inputs through one secure session (``privmed.runtime.launch.run_local_session``: this
process is the data owner, the model owner and the dealer are two local processes over mutual
TLS) with the compile options the vendor deploys (``CompileOptions``); ``PlaintextEngine`` runs
the same inputs through onnxruntime (INSECURE by nature: whoever runs it holds the weights and
the image in clear; for comparison only). Both return an ``EngineRun`` whose costs are a typed
``SessionStats``. ``privmed infer``, ``demo``, ``validate`` and ``segment`` all use these.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from privmed.errors import InputError, ModelError
from privmed.runtime.stats import BatchCost, SessionStats

FINAL_ACTIVATIONS = ("Sigmoid", "Softmax")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class ModelCard:
    """The public facts of a model file, read once (see the module docstring)."""

    path: Path
    input_shape: tuple[int, ...]  # per sample; -1 for a symbolic dim not given
    output_shape: tuple[int, ...]  # per sample; -1 for a symbolic dim
    final_op: str  # "Sigmoid" | "Softmax" | "none" (the graph ends in logits)
    labels: tuple[str, ...] | None  # ONNX metadata ``privmed.labels``
    sha256: str
    preprocess_path: Path | None  # ``<model>.preprocess.json`` if present

    @property
    def output_kind(self) -> str:
        """"probability" if the graph ends in Sigmoid/Softmax, else "logit"."""
        return "probability" if self.final_op in FINAL_ACTIVATIONS else "logit"

    @classmethod
    def read(cls, path: str | Path, input_shape: list[int] | tuple[int, ...] | None = None) -> ModelCard:
        """Parse ``path`` once; ``input_shape`` fills in (or must match) the graph's per-sample
        input shape. One-line errors for a missing or unreadable file."""
        import onnx

        p = Path(path)
        if not p.is_file():
            raise InputError(f"{p}: model file not found")
        raw = p.read_bytes()
        try:
            proto = onnx.load_model_from_string(raw)
        except Exception as exc:  # noqa: BLE001 - onnx raises DecodeError and friends
            raise ModelError(f"{p}: not a readable ONNX model ({type(exc).__name__})") from None
        return cls.from_proto(p, proto, hashlib.sha256(raw).hexdigest(), input_shape)

    @classmethod
    def from_proto(cls, p: Path, proto: Any, sha256: str, input_shape: list[int] | tuple[int, ...] | None = None) -> ModelCard:
        """The card of an already parsed ONNX ``proto`` (callers that need the graph anyway)."""
        g = proto.graph
        inits = {t.name for t in g.initializer}
        inputs = [i for i in g.input if i.name not in inits]
        if len(inputs) != 1 or len(g.output) != 1:
            raise ModelError(f"{p}: expected one input and one output, got {len(inputs)} inputs and {len(g.output)} outputs")
        dims = [d.dim_value if d.dim_value > 0 else -1 for d in inputs[0].type.tensor_type.shape.dim][1:]
        if input_shape is not None:
            given = [int(s) for s in input_shape]
            if len(given) != len(dims) or any(d > 0 and d != s for d, s in zip(dims, given, strict=True)):
                raise ModelError(f"{p}: input shape {tuple(given)} does not fit the model's {tuple(dims)}")
            dims = given
        out = [d.dim_value if d.dim_value > 0 else -1 for d in g.output[0].type.tensor_type.shape.dim][1:]
        producer = {o: n.op_type for n in g.node for o in n.output}
        final = producer.get(g.output[0].name, "")
        meta = {m.key: m.value for m in proto.metadata_props}
        labels = None
        if "privmed.labels" in meta:
            try:
                labels = tuple(str(x) for x in json.loads(meta["privmed.labels"]))
            except json.JSONDecodeError as exc:
                raise ModelError(f"{p}: metadata privmed.labels is not JSON ({exc})") from None
        pre = p.with_suffix(".preprocess.json")
        return cls(p, tuple(dims), tuple(out), final if final in FINAL_ACTIVATIONS else "none", labels,
                   sha256, pre if pre.is_file() else None)  # fmt: skip


@dataclass(frozen=True)
class CompileOptions:
    """How the model owner compiles the model (the same for infer, validate and segment, so a
    study checks the configuration that is deployed)."""

    frac_bits: int | None = None
    calibration: Path | None = None


@dataclass
class EngineRun:
    """Outputs of one engine run and what it cost."""

    engine: str
    outputs: np.ndarray
    stats: SessionStats


class Engine(Protocol):
    name: str

    def run(self, card: ModelCard, inputs: np.ndarray, *, default_chunk: int | None = None) -> EngineRun: ...


@dataclass
class SecureEngine:
    """Secure inference: one session for all N inputs, streamed in batches of ``chunk`` (the
    masked weights travel once); the outputs are revealed to this process (the data owner) only.

    Parameters
    ----------
    chunk : samples per batch (None: the caller's ``default_chunk``, else all at once).
    timeout_s : deadline of each receive; the session also stops after 20 x this without a
        finished layer (a watchdog on progress, not on length).
    progress : per-layer events (``privmed.cli.progress.LayerProgress``).
    compile : the model owner's compile options.
    expect_plan : refuse any plan whose SHA-256 fingerprint differs.
    parties : 3 (data owner, model owner, dealer) or 2 (no dealer:
        ``privmed.runtime.twoparty_launch.run_local_session_2p``).
    store : two parties only: the directory of precomputed offline material (``--store``;
        ``DIR/data-owner``, ``DIR/model-owner`` and the local CA ``DIR/pki``). Without an
        explicit ``chunk``, batches take the stored sets' batch size; a last, shorter batch is
        padded up to it with copies of the last input while sets are left (their outputs are
        dropped), so it runs on a set too instead of computing a whole offline phase inline.
    """

    chunk: int | None = None
    timeout_s: float = 120.0
    progress: Callable[[dict[str, Any]], None] | None = None
    compile: CompileOptions = field(default_factory=CompileOptions)
    workdir: Path | None = None
    expect_plan: str | None = None
    name: str = "secure"
    parties: int = 3
    store: Path | None = None
    ot_engine: str | None = None  # two parties: "ferret" | "iknp" (``--ot-engine``); None: the default

    def run(self, card: ModelCard, inputs: np.ndarray, *, default_chunk: int | None = None) -> EngineRun:
        from privmed.runtime.launch import run_local_session

        extra: dict[str, Any] = {}
        if self.parties == 2:
            from privmed.runtime.twoparty_launch import run_local_session_2p as run_local_session  # type: ignore[assignment]

            extra = ({"store": self.store} if self.store else {}) | ({"ot_engine": self.ot_engine} if self.ot_engine else {})

        chunk = self.chunk or default_chunk
        if chunk is not None and chunk < 1:
            raise InputError(f"--chunk {chunk}: expected a positive batch size")
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        n, pad = len(x), 0
        if self.parties == 2 and self.store:
            chunk, pad = self._fit_to_store(n, chunk)
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x  # a real input again: in range wherever it is
        shape = list(card.input_shape) if min(card.input_shape, default=1) > 0 else None
        result = run_local_session(
            card.path, x, timeout_s=self.timeout_s, workdir=self.workdir,
            progress=self.progress, calibration=self.compile.calibration, frac_bits=self.compile.frac_bits,
            input_shape=shape, chunk=chunk if len(x) > 1 else None, expect_plan=self.expect_plan, **extra,
        )  # fmt: skip
        if pad:
            result.stats.store["padded"] = pad
        return EngineRun(self.name, result.outputs[:n], result.stats)

    def _fit_to_store(self, n: int, chunk: int | None) -> tuple[int | None, int]:
        """(batch size, copies of the last input to append) so that ``n`` inputs use the local store's sets:
        its sets' batch size unless ``--chunk`` was given, and a short last batch padded while
        the store holds a set for it (otherwise it would compute its offline phase inline)."""
        from privmed.runtime.twoparty_store import held_sets

        held = held_sets(Path(self.store).resolve() / "data-owner") if self.store else None
        if held is None:
            return chunk, 0
        batch, left = held
        chunk = self.chunk or batch
        pad = (-n) % chunk if chunk == batch and left > n // chunk else 0
        return chunk, pad

    def precompute(self, card: ModelCard, sets: int, chunk: int) -> SessionStats:
        """Two parties with a store: both roles on this machine fill ``store`` with ``sets``
        offline phases of ``chunk`` inputs each, before any input exists (as ``privmed infer
        --precompute``); returns the precompute session's costs."""
        if self.parties != 2 or self.store is None:
            raise InputError("--precompute needs --parties 2 and --store DIR")
        from privmed.runtime.twoparty_launch import run_local_session_2p

        shape = list(card.input_shape) if min(card.input_shape, default=1) > 0 else None
        result = run_local_session_2p(
            card.path, None, timeout_s=self.timeout_s, workdir=self.workdir, calibration=self.compile.calibration,
            frac_bits=self.compile.frac_bits, input_shape=shape, chunk=chunk, expect_plan=self.expect_plan,
            store=self.store, precompute=sets, ot_engine=self.ot_engine,
        )  # fmt: skip
        return result.stats


@dataclass
class PlaintextEngine:
    """onnxruntime on this machine, for comparison only (it needs the weights in clear)."""

    threads: int = 1
    name: str = "plaintext"
    _sessions: dict[Path, Any] = field(default_factory=dict, repr=False)

    def session(self, card: ModelCard) -> Any:
        """The onnxruntime session of ``card`` (made once per engine and model)."""
        if card.path not in self._sessions:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = max(1, self.threads)
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            try:
                self._sessions[card.path] = ort.InferenceSession(str(card.path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:  # onnxruntime raises its own exception types
                raise ModelError(f"{card.path}: onnxruntime cannot load the model ({exc})") from None
        return self._sessions[card.path]

    def run(self, card: ModelCard, inputs: np.ndarray, *, default_chunk: int | None = None) -> EngineRun:
        t0 = time.perf_counter()
        session = self.session(card)
        name = session.get_inputs()[0].name
        batch_dim = session.get_inputs()[0].shape[0]
        step = batch_dim if isinstance(batch_dim, int) and batch_dim > 0 else (default_chunk or len(inputs) or 1)
        x = np.ascontiguousarray(inputs, dtype=np.float32)
        outs: list[np.ndarray] = []
        batches: list[BatchCost] = []
        for i in range(0, len(x), step):
            tb = time.perf_counter()
            outs.append(np.asarray(session.run(None, {name: x[i : i + step]})[0]))
            batches.append(BatchCost(len(batches), len(x[i : i + step]), round(time.perf_counter() - tb, 6)))
        wall = time.perf_counter() - t0
        out = np.concatenate(outs) if outs else np.zeros((0, *[max(d, 0) for d in card.output_shape]), np.float32)
        return EngineRun(self.name, out, SessionStats(wall_s=round(wall, 3), online_s=round(wall, 3), batches=batches))
