"""RUN_DIR: what a federated run leaves on the server's disk, and how it resumes.

Layout::

    RUN_DIR/manifest.json            the run's FederatedConfig (flat form) + versions
    RUN_DIR/rounds/round-NNNN.npz    global weights after round NNNN (0000 = initial)
    RUN_DIR/rounds/round-NNNN.json   that round's metrics + SHA-256 of the .npz
    RUN_DIR/status.json              "running" | "complete" | "stopped-budget" | "failed"
    RUN_DIR/sites/<site>/            simulation only: each site's privacy ledger
    RUN_DIR/model.onnx, report.*     written only once the run is complete or budget-stopped

A round counts as completed only when its ``.json`` exists and names the SHA-256 of its
``.npz``; both are written to a temporary name, fsynced and renamed, weights first, so a
crash at any instant leaves either the whole round or none of it. A resumed run (same
RUN_DIR, same configuration; only ``rounds`` may grow) restarts after the last completed
round with exactly its weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import ConfigError, InputError
from privmed.federated.config import FederatedConfig

__all__ = ["RunDir", "atomic_write_bytes", "atomic_write_json"]

MANIFEST_FORMAT = "privmed-federated-run"
_ROUND_RE = re.compile(r"round-(\d{4})\.json$")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a fsynced temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, body: Any) -> None:
    atomic_write_bytes(path, (json.dumps(body, indent=2, allow_nan=False) + "\n").encode("utf-8"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: unreadable ({exc})") from None


class RunDir:
    """A run directory (see module docstring). Not thread-safe: one server writes it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    # -- manifest ---------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def open(self, config: FederatedConfig) -> FederatedConfig:
        """Create the run, or check that an existing one has the same configuration.

        Only ``rounds`` may differ (a run may be extended); ConfigError names the first other
        key that differs. Returns the configuration to run with.
        """
        if self.manifest_path.exists():
            stored = self.stored_config()
            old, new = stored.to_flat(), config.to_flat()
            for key in sorted(set(old) | set(new)):
                if key != "rounds" and old.get(key) != new.get(key):
                    raise ConfigError(
                        f"{self.root}: holds a run with {key}={old.get(key)!r}, this command asks"
                        f" for {key}={new.get(key)!r}; use a new --out directory or the same settings"
                    )
            if config.rounds < self.last_round():
                raise ConfigError(
                    f"{self.root}: already completed {self.last_round()} rounds, more than --rounds {config.rounds}"
                )
            if config.rounds != stored.rounds:
                self._write_manifest(config)
            return config
        self._write_manifest(config)
        return config

    def _write_manifest(self, config: FederatedConfig) -> None:
        import flwr
        import opacus
        import torch

        from privmed import __version__

        atomic_write_json(
            self.manifest_path,
            {
                "format": MANIFEST_FORMAT,
                "version": 1,
                "config": config.to_flat(),
                "versions": {
                    "privmed": __version__,
                    "flwr": flwr.__version__,
                    "opacus": opacus.__version__,
                    "torch": torch.__version__,
                },
            },
        )

    def stored_config(self) -> FederatedConfig:
        body = _read_json(self.manifest_path)
        if not isinstance(body, dict) or body.get("format") != MANIFEST_FORMAT:
            raise InputError(f"{self.manifest_path}: expected a {MANIFEST_FORMAT} manifest")
        return FederatedConfig.from_flat(body["config"], source=str(self.manifest_path))

    # -- rounds -----------------------------------------------------------------------------
    def _round_paths(self, server_round: int) -> tuple[Path, Path]:
        stem = self.root / "rounds" / f"round-{server_round:04d}"
        return stem.with_suffix(".npz"), stem.with_suffix(".json")

    def completed_rounds(self) -> list[int]:
        """Rounds whose weights and metrics are both on disk and consistent, ascending."""
        folder = self.root / "rounds"
        if not folder.is_dir():
            return []
        done = []
        for path in folder.iterdir():
            match = _ROUND_RE.match(path.name)
            if match and self._round_is_whole(int(match.group(1))):
                done.append(int(match.group(1)))
        return sorted(done)

    def _round_is_whole(self, server_round: int) -> bool:
        npz, meta = self._round_paths(server_round)
        if not (npz.exists() and meta.exists()):
            return False
        body = _read_json(meta)
        return body.get("weights_sha256") == hashlib.sha256(npz.read_bytes()).hexdigest()

    def last_round(self) -> int:
        """Last completed round; 0 = only the initial weights; -1 = nothing yet."""
        done = self.completed_rounds()
        return done[-1] if done else -1

    def save_round(
        self, server_round: int, names: Sequence[str], arrays: Sequence[np.ndarray], metrics: dict[str, Any]
    ) -> None:
        """Write round ``server_round`` (weights first, then the metrics that commit it)."""
        import io

        npz, meta = self._round_paths(server_round)
        buf = io.BytesIO()
        named = {f"{i:04d}": np.asarray(a, np.float32) for i, a in enumerate(arrays)}
        np.savez(buf, names=np.array(list(names)), **named)  # type: ignore[arg-type]
        data = buf.getvalue()
        atomic_write_bytes(npz, data)
        atomic_write_json(
            meta,
            {"round": server_round, "weights_sha256": hashlib.sha256(data).hexdigest(), **metrics},
        )

    def load_round(self, server_round: int) -> tuple[list[str], list[np.ndarray], dict[str, Any]]:
        """(parameter names, weights, metrics) of a completed round."""
        if not self._round_is_whole(server_round):
            raise InputError(f"{self.root}: round {server_round} is not a completed checkpoint")
        npz, meta = self._round_paths(server_round)
        with np.load(npz, allow_pickle=False) as data:
            names = [str(n) for n in data["names"]]
            arrays = [data[f"{i:04d}"] for i in range(len(names))]
        return names, arrays, _read_json(meta)

    def ema_weights(self, decay: float, upto: int) -> list[np.ndarray]:
        """Exponential moving average of the global weights of rounds 0..``upto``:
        ``ema_0 = w_0``, ``ema_r = decay ema_(r-1) + (1 - decay) w_r`` (float64, then float32).
        A function of the checkpoints only, so a resumed run recomputes it exactly."""
        ema: list[np.ndarray] | None = None
        for r in range(upto + 1):
            weights = [np.asarray(w, np.float64) for w in self.load_round(r)[1]]
            ema = weights if ema is None else [decay * e + (1 - decay) * w for e, w in zip(ema, weights, strict=True)]
        if ema is None:
            raise InputError(f"{self.root}: no completed rounds to average")
        return [e.astype(np.float32) for e in ema]

    def round_metrics(self) -> list[dict[str, Any]]:
        """Metrics of completed rounds 1..last, in order."""
        return [self.load_round(r)[2] for r in self.completed_rounds() if r > 0]

    # -- status -----------------------------------------------------------------------------
    @property
    def status_path(self) -> Path:
        return self.root / "status.json"

    def write_status(self, state: str, message: str = "") -> None:
        if state not in ("running", "complete", "stopped-budget", "failed"):
            raise ValueError(f"unknown run state {state!r}")
        atomic_write_json(
            self.status_path, {"state": state, "message": message, "last_round": self.last_round()}
        )

    def status(self) -> dict[str, Any]:
        if not self.status_path.exists():
            return {"state": "missing", "message": "", "last_round": self.last_round()}
        body = _read_json(self.status_path)
        return body if isinstance(body, dict) else {"state": "missing", "message": "", "last_round": -1}

    def site_state_dir(self, site: str) -> Path:
        """Simulation: where site ``site`` keeps its privacy ledger."""
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", site)
        return self.root / "sites" / safe
