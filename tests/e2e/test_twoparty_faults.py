"""Two-party sessions by `privmed party --parties 2` (two processes, mutual TLS, no dealer).

An honest run writes the output, equal to onnxruntime's. Faults: a peer killed or hung mid-run
is named by the other within its receive deadline (plus process start-up margin), with the
step; a data owner whose certificate comes from another CA is refused by the model owner and
nothing runs.

The model: ``export_cnn`` at 1x32x32, 4 channels, 6 extra conv+ReLU blocks: an online walk of
about 20 layers after the offline phase, so a fault after layer 3 lands online.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import numpy as np
import pytest

from tests.e2e.conftest import CertSet, PartyRun, TinyModel, export_cnn, free_port

pytest.importorskip("tenseal", reason="tenseal not installed: pip install 'privmed[twoparty]'")

MARGIN_S = 4.0  # beyond the configured deadline: process start-up on 2 busy cores
PARTIES = ("--parties", "2")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return export_cnn(tmp_path_factory.mktemp("cnn2p"), channels=4, size=32, depth=6, batch=1, seed=2)


def write_session_2p(path: Path, pki: CertSet, port: int, *, timeout_s: float, data_owner: CertSet | None = None,
                     connect_timeout_s: float = 20.0) -> Path:  # fmt: skip
    """A two-party session.toml (no [dealer]); ``data_owner`` gives its certificate from another CA."""
    cert, key = (data_owner or pki).certs["data-owner"]
    mcert, mkey = pki.certs["model-owner"]
    path.write_text(
        f'[session]\nca = "{pki.ca}"\ntimeout_s = {timeout_s}\nconnect_timeout_s = {connect_timeout_s}\n\n'
        f'[data-owner]\ncert = "{cert}"\nkey = "{key}"\n\n'
        f'[model-owner]\ncert = "{mcert}"\nkey = "{mkey}"\nhost = "127.0.0.1"\nport = {port}\n'
    )
    return path


def _start(run: PartyRun, model: TinyModel) -> None:
    run.start("model-owner", *PARTIES, "--model", model.onnx)
    run.start("data-owner", *PARTIES, "--input", model.input, "--output", run.workdir / "out.npy")


def _fault(tmp_path: Path, pki: CertSet, model: TinyModel, victim: str, sig: signal.Signals, timeout_s: float) -> tuple[PartyRun, str, float]:
    """Hit ``victim`` after the data owner's third online layer; returns (run, survivor, seconds
    from the hit to the survivor's exit)."""
    run = PartyRun(tmp_path, write_session_2p(tmp_path / "session.toml", pki, free_port(), timeout_s=timeout_s))
    survivor = "model-owner" if victim == "data-owner" else "data-owner"
    try:
        _start(run, model)
        run.wait_progress(3, timeout_s=90)
        hit = run.signal(victim, sig)
        ended = run.wait_exits((survivor,), timeout_s + MARGIN_S)[survivor]
    finally:
        run.kill_all()
    assert ended is not None, f"{survivor} did not exit within {timeout_s + MARGIN_S:.0f} s of the fault\n{run.report()}"
    return run, survivor, ended - hit


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["model-owner", "data-owner"])
def test_peer_killed_mid_run_is_named_with_the_step(tmp_path: Path, session_ca: CertSet, cnn: TinyModel, victim: str) -> None:
    run, survivor, after = _fault(tmp_path, session_ca, cnn, victim, signal.SIGKILL, timeout_s=5.0)
    message = run.message(survivor)
    assert run.code(survivor) not in (None, 0) and victim in message, run.report()
    assert re.search(r"during .*\bn\d+_[a-z]+", message), f"{survivor} does not name the layer: {message}"
    assert after <= 5.0 + MARGIN_S
    assert not (tmp_path / "out.npy").exists()


@pytest.mark.slow
def test_model_owner_hung_mid_run_data_owner_times_out_naming_it(tmp_path: Path, session_ca: CertSet, cnn: TinyModel) -> None:
    run, survivor, after = _fault(tmp_path, session_ca, cnn, "model-owner", signal.SIGSTOP, timeout_s=3.0)
    assert run.code(survivor) not in (None, 0) and "model-owner" in run.message(survivor), run.report()
    assert 3.0 - 0.5 <= after <= 3.0 + MARGIN_S


def test_data_owner_with_a_certificate_from_another_ca_is_refused(tmp_path: Path, session_ca: CertSet, rogue_ca: CertSet,
                                                                  cnn: TinyModel) -> None:  # fmt: skip
    config = write_session_2p(tmp_path / "session.toml", session_ca, free_port(), timeout_s=5.0, data_owner=rogue_ca, connect_timeout_s=5.0)
    run = PartyRun(tmp_path, config)
    try:
        _start(run, cnn)
        ended = run.wait_exits(("data-owner", "model-owner"), 40.0)
    finally:
        run.kill_all()
    assert all(t is not None for t in ended.values()), run.report()
    assert run.code("data-owner") not in (None, 0) and run.code("model-owner") not in (None, 0), run.report()
    assert "model-owner refused the TLS connection" in run.message("data-owner"), run.report()
    assert "CERTIFICATE_VERIFY_FAILED" in run.message("model-owner"), run.report()
    assert not (tmp_path / "out.npy").exists()


def test_both_roles_by_privmed_party_match_onnxruntime(tmp_path: Path, session_ca: CertSet, cnn: TinyModel) -> None:
    """Tolerance 2e-3 on probabilities: as ``test_twoparty_infer`` (f = 16, a few ulp per ReLU
    layer through 9 layers; measured about 1e-5)."""
    run = PartyRun(tmp_path, write_session_2p(tmp_path / "session.toml", session_ca, free_port(), timeout_s=30.0))
    try:
        _start(run, cnn)
        ended = run.wait_exits(("data-owner", "model-owner"), 120.0)
    finally:
        run.kill_all()
    assert all(t is not None for t in ended.values()) and run.code("data-owner") == 0 and run.code("model-owner") == 0, run.report()
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), cnn.expected, rtol=0, atol=2e-3)
