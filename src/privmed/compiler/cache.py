"""The model owner's plan cache: compile an ONNX model once, reuse the plan and weights.

A vendor runs the same model for many sessions; compiling it (ONNX lowering, float
calibration, ring choice, weight encoding) costs about half a second for DenseNet-121 at
224x224 in every one-shot ``privmed infer`` / ``privmed party``. ``compile_cached`` stores the
result, keyed by SHA-256 over everything the compilation depends on:

- the model file's bytes, the calibration array (bytes, dtype, shape) or "default", and the
  options (frac_bits, input_shape, ring_bits);
- the source of the compiler and of the layers it builds on (``privmed/compiler``,
  ``privmed/ir``, ``privmed/ring``, ``privmed/reference``), so a changed compiler never
  reuses an old plan.

The entry lives in ``$PRIVMED_CACHE_DIR`` (default ``$XDG_CACHE_HOME/privmed/plans``, else
``~/.cache/privmed/plans``), a 0700 directory: ``<key>.json`` (the plan with its private
calibration report, the weight widths and the weights' layout) and ``<key>.npz`` (the weights,
one flat array per field, loaded with ``allow_pickle=False``), both written 0600 and renamed into place, since they hold the
vendor's weights exactly as the ONNX file does. ``PRIVMED_PLAN_CACHE=off`` turns the cache
off. A damaged entry is compiled again and replaced (one warning line in the log, on stderr
under the CLI). The cache is the
model owner's own file on its own disk: nothing in it comes from a peer, and the data owner
still checks every plan it receives (``ir.check.parse_plan``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from privmed.ir.plan import Plan, PrivateWeights

log = logging.getLogger(__name__)

_SOURCES = ("compiler", "ir", "ring", "reference")
_FIELDS = ("weight", "bias", "float_weight", "float_bias")


def cache_dir() -> Path | None:
    """The cache directory, or None when ``PRIVMED_PLAN_CACHE=off``."""
    if os.environ.get("PRIVMED_PLAN_CACHE", "").lower() in ("off", "0", "no"):
        return None
    if os.environ.get("PRIVMED_CACHE_DIR"):
        return Path(os.environ["PRIVMED_CACHE_DIR"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "privmed" / "plans"


def _code_digest() -> bytes:
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for sub in _SOURCES:
        for f in sorted((root / sub).rglob("*.py")):
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.digest()


def cache_key(path: Path, calibration: np.ndarray | None, options: dict[str, Any]) -> str:
    """SHA-256 (hex) of the model bytes, the calibration, the options and the compiler source."""
    h = hashlib.sha256(b"privmed plan cache v1\0")
    h.update(hashlib.sha256(Path(path).read_bytes()).digest())
    if calibration is None:
        h.update(b"default")
    else:
        cal = np.ascontiguousarray(calibration)
        h.update(f"{cal.dtype.str}{cal.shape}".encode() + hashlib.sha256(cal.tobytes()).digest())
    h.update(json.dumps(options, sort_keys=True).encode())
    h.update(_code_digest())
    return h.hexdigest()


def compile_cached(path: Path, *, calibration: np.ndarray | None = None, frac_bits: int | None = None,
                   input_shape: list[int] | None = None, ring_bits: int | None = None) -> tuple[Plan, PrivateWeights]:  # fmt: skip
    """``compile_model`` with the result kept in the plan cache (see the module docstring).
    Returns the same plan (same fingerprint) and weights as compiling afresh."""
    def fresh() -> tuple[Plan, PrivateWeights]:
        # imported here: onnx and the compiler load only on a miss (~0.06 s of every hit)
        from privmed.compiler.compile import compile_model

        return compile_model(path, calibration=calibration, frac_bits=frac_bits, input_shape=input_shape, ring_bits=ring_bits)

    root = cache_dir()
    if root is None:
        return fresh()
    key = cache_key(path, calibration, {"frac_bits": frac_bits, "input_shape": input_shape, "ring_bits": ring_bits})
    meta, arrays = root / f"{key}.json", root / f"{key}.npz"
    if meta.exists() and arrays.exists():
        try:
            return _load(meta, arrays)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("plan cache entry %s unreadable (%s): compiling again", meta, exc)
    plan, weights = fresh()
    try:
        _store(root, key, plan, weights)
    except (OSError, TypeError, ValueError) as exc:  # a read-only home, a report that is not JSON
        log.warning("plan not cached in %s (%s)", root, exc)
    return plan, weights


def _load(meta: Path, arrays: Path) -> tuple[Plan, PrivateWeights]:
    raw = json.loads(meta.read_text())
    plan = Plan.from_json(json.dumps(raw["plan"]))
    plan.report = raw["report"]
    weights = PrivateWeights(weight_bits={k: int(v) for k, v in raw["weight_bits"].items()})
    with np.load(arrays, allow_pickle=False) as z:
        for field in _FIELDS:
            flat = z[field]
            out = getattr(weights, field)
            for node, shape, start in raw["layout"][field]:
                size = int(np.prod(shape))
                if start < 0 or start + size > flat.size:
                    raise ValueError(f"{field}/{node} outside the stored array")
                out[node] = flat[start : start + size].reshape(shape)
    if plan.fingerprint() != raw["fingerprint"]:
        raise ValueError("fingerprint mismatch")
    return plan, weights


def _store(root: Path, key: str, plan: Plan, weights: PrivateWeights) -> None:
    """One flat array per weight field (a field's arrays share a dtype) and its layout in the
    JSON: one npz member per field instead of one per layer, so loading parses 4 headers."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    layout: dict[str, list[tuple[str, list[int], int]]] = {}
    flats: dict[str, np.ndarray] = {}
    for field in _FIELDS:
        items = getattr(weights, field)
        dtypes = {np.asarray(a).dtype for a in items.values()}
        if len(dtypes) > 1:
            raise ValueError(f"{field} mixes dtypes {sorted(map(str, dtypes))}")
        start, layout[field] = 0, []
        for node, a in items.items():
            layout[field].append((node, list(np.shape(a)), start))
            start += int(np.size(a))
        dtype = dtypes.pop() if dtypes else np.dtype(np.float64)
        flats[field] = np.concatenate([np.asarray(a).reshape(-1) for a in items.values()]) if items else np.zeros(0, dtype)
    meta = {"fingerprint": plan.fingerprint(), "plan": plan.public_dict(), "report": plan.report,
            "weight_bits": weights.weight_bits, "layout": layout}  # fmt: skip
    text = json.dumps(meta, sort_keys=True)
    _write_private(root / f"{key}.npz", lambda f: np.savez(f, **flats))  # type: ignore[arg-type]
    _write_private(root / f"{key}.json", lambda f: f.write(text.encode()))


def _write_private(dest: Path, write: Any) -> None:
    """Write through a 0600 temporary file in the same directory, then rename into place."""
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-", suffix=dest.suffix)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
