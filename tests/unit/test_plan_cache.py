"""The model owner's plan cache returns what a fresh compilation returns, and never a stale or
damaged entry."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from privmed.cli.demo import shipped_model as model_path
from privmed.compiler import cache
from privmed.compiler.cache import compile_cached
from privmed.compiler.compile import compile_model


def _same(a, b) -> None:  # type: ignore[no-untyped-def]
    (pa, wa), (pb, wb) = a, b
    assert pa.fingerprint() == pb.fingerprint() and pa.report == pb.report and pa.ring_bits == pb.ring_bits
    assert wa.weight_bits == wb.weight_bits
    for field in ("weight", "bias", "float_weight", "float_bias"):
        da, db = getattr(wa, field), getattr(wb, field)
        assert list(da) == list(db)
        for k in da:
            assert da[k].dtype == db[k].dtype and np.array_equal(da[k], db[k]), (field, k)


def test_a_cached_plan_equals_a_fresh_compilation_and_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVMED_CACHE_DIR", str(tmp_path / "plans"))
    model = model_path()
    fresh = compile_model(model)
    first = compile_cached(model)  # compiles and stores
    files = sorted(p.suffix for p in (tmp_path / "plans").iterdir())
    assert files == [".json", ".npz"]
    assert stat.S_IMODE((tmp_path / "plans").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (tmp_path / "plans").iterdir())
    second = compile_cached(model)  # read back
    _same(first, fresh)
    _same(second, fresh)


def test_other_options_models_or_compiler_source_get_their_own_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVMED_CACHE_DIR", str(tmp_path / "plans"))
    model = model_path()
    base = cache.cache_key(model, None, {"frac_bits": None})
    assert cache.cache_key(model, None, {"frac_bits": 12}) != base
    assert cache.cache_key(model, np.zeros((1, 1, 64, 64)), {"frac_bits": None}) != base
    copy = tmp_path / "m.onnx"
    copy.write_bytes(model.read_bytes() + b"\0")
    assert cache.cache_key(copy, None, {"frac_bits": None}) != base
    monkeypatch.setattr(cache, "_code_digest", lambda: b"another compiler")
    assert cache.cache_key(model, None, {"frac_bits": None}) != base
    assert compile_cached(model, frac_bits=12)[0].frac_bits == compile_model(model, frac_bits=12)[0].frac_bits


def test_a_damaged_entry_is_compiled_again_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    monkeypatch.setenv("PRIVMED_CACHE_DIR", str(tmp_path / "plans"))
    model = model_path()
    compile_cached(model)
    npz = next((tmp_path / "plans").glob("*.npz"))
    npz.write_bytes(b"not a zip file")
    with caplog.at_level(logging.WARNING, logger="privmed.compiler.cache"):
        again = compile_cached(model)
    err = [r.getMessage() for r in caplog.records]
    assert len(err) == 1 and "unreadable" in err[0] and "compiling again" in err[0]
    _same(again, compile_model(model))
    caplog.clear()
    _same(compile_cached(model), again)  # the entry was replaced
    assert caplog.records == []


def test_the_cache_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVMED_CACHE_DIR", str(tmp_path / "plans"))
    monkeypatch.setenv("PRIVMED_PLAN_CACHE", "off")
    compile_cached(model_path())
    assert not (tmp_path / "plans").exists()
    assert os.environ["PRIVMED_PLAN_CACHE"] == "off"
