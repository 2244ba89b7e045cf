"""Choosing the two-party OT engine: the session file's ``[session] ot_engine``, the CLI's
``--ot-engine`` (which overrides it, and the environment), each bad value refused in one line
that names where it came from; both parties still agree the engine at set-up."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from privmed.cli.main import main
from privmed.compiler.compile import compile_model
from privmed.crypto.certs import Identity
from privmed.errors import ConfigError
from privmed.runtime.config import Endpoint
from tests.protocol.onnx_models import rand
from tests.protocol.twoparty_harness import run_two

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

from privmed.mpc.twoparty import protocols  # noqa: E402
from privmed.runtime.twoparty import data_owner_2p, model_owner_2p  # noqa: E402
from privmed.runtime.twoparty_launch import load_config_2p, write_config_2p  # noqa: E402
from tests.protocol.test_twoparty_session import _tiny  # noqa: E402


def _session_file(tmp_path: Path, ot_engine: str | None) -> Path:
    ids = {r: Identity(r, tmp_path / f"{r}.pem", tmp_path / f"{r}.key", tmp_path / "ca.pem") for r in ("data-owner", "model-owner")}
    path = tmp_path / "session.toml"
    write_config_2p(path, ids, Endpoint("127.0.0.1", 7100, None), 60.0, 30.0, ot_engine)
    return path


@pytest.mark.parametrize("engine", ["ferret", "iknp", None])
def test_session_file_carries_the_ot_engine(tmp_path: Path, engine: str | None) -> None:
    # Execute: written as local runs write it, read as every role reads it
    cfg = load_config_2p(_session_file(tmp_path, engine))

    # Assert
    assert cfg.options.get("ot_engine") == engine


@pytest.mark.parametrize(("line", "message"), [('ot_engine = "silent"', "'ot_engine' must be one of 'iknp', 'ferret', got 'silent'"),
                                               ("ot_engine = 3", "'ot_engine' must be str, got 3")])  # fmt: skip
def test_bad_ot_engine_in_the_session_file_is_one_line_naming_file_and_value(tmp_path: Path, line: str, message: str) -> None:
    # Prepare: a valid file with the key replaced
    path = _session_file(tmp_path, "iknp")
    path.write_text(path.read_text().replace('ot_engine = "iknp"', line))

    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        load_config_2p(path)
    assert str(err.value) == f"{path} [session]: {message}"


def test_bad_ot_engine_through_privmed_party_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Prepare
    path = _session_file(tmp_path, "iknp")
    path.write_text(path.read_text().replace('ot_engine = "iknp"', 'ot_engine = "Ferret"'))
    np.save(tmp_path / "x.npy", np.zeros((1, 2, 6, 6), np.float32))

    # Execute: before any connection is tried
    code = main(["party", "--parties", "2", "--role", "data-owner", "--config", str(path), "--input", str(tmp_path / "x.npy"),
                 "--output", str(tmp_path / "y.npy")])  # fmt: skip

    # Assert
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err == f"privmed: error: {path} [session]: 'ot_engine' must be one of 'iknp', 'ferret', got 'Ferret'\n"


def test_ot_engine_option_needs_two_parties_and_a_known_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Execute / Assert: with the dealer mode, one line
    code = main(["infer", "--model", str(tmp_path / "m.onnx"), "--input", str(tmp_path / "x.npy"), "--output",
                 str(tmp_path / "y.npy"), "--ot-engine", "iknp"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err == "privmed: error: --ot-engine iknp: the OT engine is for the two-party mode (--parties 2)\n"

    # an unknown engine: argparse names the choices
    with pytest.raises(SystemExit) as info:
        main(["party", "--parties", "2", "--role", "data-owner", "--config", "s.toml", "--ot-engine", "silent"])
    assert info.value.code == 2 and "invalid choice: 'silent' (choose from 'ferret', 'iknp')" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["validate", "--model", "m.onnx", "--data", "d", "--out", "o"],
                                  ["segment", "--model", "m.onnx", "--input", "ct.nii.gz", "--output", "mask.nii.gz"]])  # fmt: skip
def test_ot_engine_option_of_validate_and_segment_needs_two_parties(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Execute / Assert: refused before anything is read
    code = main([*argv, "--ot-engine", "ferret"])
    err = capsys.readouterr().err
    assert code == 2 and err == "privmed: error: --ot-engine ferret: the OT engine is for the two-party mode (--parties 2)\n"


def test_local_engine_writes_its_ot_engine_for_both_roles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the local launcher replaced by a recorder (what infer / validate / segment build)
    from privmed.engines import ModelCard, SecureEngine
    from privmed.runtime import twoparty_launch

    seen: list[dict[str, Any]] = []

    class Result:
        outputs = np.zeros((1, 3), np.float32)
        stats = None

    def record(model: Path, x: Any, **kwargs: Any) -> Result:
        seen.append(kwargs)
        return Result()

    monkeypatch.setattr(twoparty_launch, "run_local_session_2p", record)
    card = ModelCard.read(_tiny(tmp_path, np.random.default_rng(0)))

    # Execute
    SecureEngine(parties=2, ot_engine="iknp").run(card, np.zeros((1, 2, 6, 6), np.float32))
    SecureEngine(parties=2, store=tmp_path / "st", ot_engine="iknp").precompute(card, 1, 1)
    SecureEngine(parties=2).run(card, np.zeros((1, 2, 6, 6), np.float32))

    # Assert: passed on when chosen, left to the default otherwise
    assert [k.get("ot_engine") for k in seen] == ["iknp", "iknp", None]


def test_the_chosen_engine_reaches_the_session_over_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: the environment says ferret, and Ferret may not be attached
    rng = np.random.default_rng(0)
    plan, weights = compile_model(_tiny(tmp_path, rng))
    x = rand(rng, 1, 2, 6, 6)
    monkeypatch.setenv(protocols.OT_ENGINE_ENV, "ferret")

    def no_ferret(*args: Any) -> None:
        raise AssertionError("Ferret attached although the session chose IKNP")

    monkeypatch.setattr(protocols, "attach_ferret", no_ferret)

    # Execute: both parties given iknp (as run_role_2p passes --ot-engine or the file's key)
    (out, _), _, _ = run_two(lambda ch: data_owner_2p(ch, x, ot_engine="iknp"),
                             lambda ch: model_owner_2p(ch, plan, weights, ot_engine="iknp"), timeout_s=60)  # fmt: skip

    # Assert: the session ran on IKNP; and parties given different engines stop, naming both
    assert out.shape == (1, 3)
    with pytest.raises(RuntimeError) as err:
        run_two(lambda ch: data_owner_2p(ch, x, ot_engine="iknp"), lambda ch: model_owner_2p(ch, plan, weights, ot_engine="ferret"),
                timeout_s=60)  # fmt: skip
    assert "this party runs iknp, model-owner runs 'ferret'" in str(err.value)
