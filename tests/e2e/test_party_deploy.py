"""Deployment mode: the three roles as separate `privmed party` processes with a session.toml.

Each role runs from its own "host" folder holding only its own key, certificate, the CA
certificate and its own secret (model or image), as on three machines; they talk TCP + mutual
TLS 1.3 on 127.0.0.1. Also: certificates from another CA or for another role, a port already
in use, a session file or key that is missing. Tests marked ``xfail(strict=True)`` with reason
"ENGINE BUG" reproduce engine bugs reported to the lead (they XPASS, i.e. fail, once fixed).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from .conftest import (
    ROLES,
    CertSet,
    PartyRun,
    TinyModel,
    error_message,
    free_port,
    hold_port,
    make_certs_cli,
    run_privmed,
    time_wait_port,
    wait_exits_all,
    write_session,
)

ATOL = 1e-3  # as in test_infer_faults: 16 fractional bits, a few layers, then softmax
MARGIN_S = 4.0  # beyond a configured deadline: process start-up on 2 busy cores
# every wait below has its own, shorter deadline
pytestmark = pytest.mark.timeout(180)
SESSION_TOML = """\
# privmed session: the same file on the three hosts; each host has only its own key.
[session]
ca = "ca.pem"
timeout_s = 10
connect_timeout_s = 20

[data-owner]          # the hospital: connects to the other two, listens on nothing
cert = "data-owner.pem"
key = "data-owner.key"

[model-owner]         # the vendor: listens for the data owner, connects to the dealer
host = "127.0.0.1"
port = {model_port}
cert = "model-owner.pem"
key = "model-owner.key"

[dealer]              # the helper: listens for both
host = "127.0.0.1"
port = {dealer_port}
cert = "dealer.pem"
key = "dealer.key"
"""
HOSTS = {"data-owner": "hospital", "model-owner": "vendor", "dealer": "helper"}


def _hosts(base: Path, pki: CertSet, model_port: int, dealer_port: int) -> dict[str, Path]:
    """One folder per host with session.toml, ca.pem and only that role's certificate and key."""
    hosts = {}
    for role, host in HOSTS.items():
        d = base / host
        d.mkdir(parents=True)
        shutil.copy(pki.ca, d / "ca.pem")
        cert, key = pki.certs[role]
        shutil.copy(cert, d / f"{role}.pem")
        shutil.copy(key, d / f"{role}.key")
        (d / "session.toml").write_text(
            SESSION_TOML.format(model_port=model_port, dealer_port=dealer_port)
        )
        hosts[role] = d
    return hosts


def test_three_hosts_match_onnxruntime(tmp_path: Path, tiny_cnn: TinyModel) -> None:
    # Prepare: a CA made with `privmed certs`, three host folders, the secrets where they belong
    pki = make_certs_cli(tmp_path / "ca")
    hosts = _hosts(tmp_path / "hosts", pki, free_port(), free_port())
    shutil.copy(tiny_cnn.onnx, hosts["model-owner"] / "model.onnx")
    shutil.copy(tiny_cnn.input, hosts["data-owner"] / "image.npy")
    args = {
        "data-owner": ["--input", "image.npy", "--output", "result/probs.npy"],
        "model-owner": ["--model", "model.onnx"],
        "dealer": [],
    }
    runs = {role: PartyRun(hosts[role], Path("session.toml"), cwd=hosts[role]) for role in ROLES}
    try:
        # Execute: the listeners first, as an operator would, but any order works (bounded retries)
        for role in ("dealer", "model-owner", "data-owner"):
            runs[role].start(role, *args[role], "--stats", f"{role}.stats.json", progress=False)
        wait_exits_all([(run, (role,)) for role, run in runs.items()], 60)
        # Assert
        for role, run in runs.items():
            assert run.code(role) == 0, "\n".join(r.report() for r in runs.values())
            assert "Traceback" not in run.stderr(role) and "error" not in run.stderr(role), (
                run.report()
            )
        out_line = runs["data-owner"].stdout("data-owner")
        assert re.search(r"output \(2, 3\) written to result/probs\.npy", out_line), out_line
        got = np.load(hosts["data-owner"] / "result" / "probs.npy")
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, tiny_cnn.expected, atol=ATOL, rtol=0)
        for role in ROLES:
            stats = json.loads((hosts[role] / f"{role}.stats.json").read_text())
            assert stats["role"] == role and stats["bytes_sent"] > 0 and stats["peak_rss_mb"] > 0, (
                stats
            )
        # only the data owner learns the output; the model never leaves the vendor's folder
        assert sorted(p.name for p in hosts["data-owner"].rglob("*.npy")) == [
            "image.npy",
            "probs.npy",
        ]
        assert not list(hosts["model-owner"].rglob("*.npy")) and not list(
            hosts["dealer"].rglob("*.npy")
        )
    finally:
        for run in runs.values():
            run.kill_all()


# -- 6. a certificate not signed by the session CA (or for another role) ---------------------------

REFUSED_CONNECT_TIMEOUT_S = 3.0


@dataclass
class RefusedClient:
    run: PartyRun
    model_port: int


@pytest.fixture(scope="module")
def refused_clients(
    tmp_path_factory: pytest.TempPathFactory,
    session_ca: CertSet,
    rogue_ca: CertSet,
    tiny_cnn: TinyModel,
) -> Iterator[dict[str, RefusedClient]]:
    """Two sessions at once in which the data owner presents a bad certificate.

    "foreign-ca": a data-owner certificate from another CA; "wrong-role": the dealer's own
    (valid) certificate used as the data owner's.
    """
    base = tmp_path_factory.mktemp("refused")
    cases: dict[str, RefusedClient] = {}
    try:
        for case in ("foreign-ca", "wrong-role"):
            run = PartyRun(base / case, base / case / "session.toml")
            run.workdir.mkdir()
            ports = {"model-owner": free_port(), "dealer": free_port()}
            if case == "foreign-ca":
                override = {"data-owner": rogue_ca}
            else:
                override = {
                    "data-owner": CertSet(session_ca.ca, {"data-owner": session_ca.certs["dealer"]})
                }
            write_session(
                run.config,
                session_ca,
                ports,
                connect_timeout_s=REFUSED_CONNECT_TIMEOUT_S,
                override=override,
            )
            cases[case] = RefusedClient(run, ports["model-owner"])
            run.start("dealer")
            run.start("model-owner", "--model", tiny_cnn.onnx)
            run.start("data-owner", "--input", tiny_cnn.input, "--output", run.workdir / "out.npy")
        wait_exits_all(
            [(c.run, ROLES) for c in cases.values()], REFUSED_CONNECT_TIMEOUT_S + 3 * MARGIN_S
        )
        yield cases
    finally:
        for c in cases.values():
            c.run.kill_all()


@pytest.mark.parametrize("case", ["foreign-ca", "wrong-role"])
def test_bad_client_certificate_is_refused(
    refused_clients: dict[str, RefusedClient], case: str
) -> None:
    run = refused_clients[case].run
    for role in ROLES:
        assert role in run.ended_at, f"{role} still running\n{run.report()}"
        assert run.code(role) == 2, run.report()
    # the data owner gives up quickly; the model owner never accepted it and says nobody came
    assert run.lifetime("data-owner") <= REFUSED_CONNECT_TIMEOUT_S + MARGIN_S, run.report()
    mo = run.message("model-owner")
    assert "data-owner did not connect to model-owner" in mo, mo
    assert not (run.workdir / "out.npy").exists()
    assert "model-owner" in run.message("data-owner") or "dealer" in run.message("data-owner"), (
        run.report()
    )


@pytest.mark.parametrize("case", ["foreign-ca", "wrong-role"])
def test_bad_client_certificate_message_says_certificate(
    refused_clients: dict[str, RefusedClient], case: str
) -> None:
    message = refused_clients[case].run.message("data-owner")
    assert re.search(r"(?i)certificate|handshake|tls", message), message
    # both listeners refuse it: naming either is right
    assert re.search(r"model-owner|dealer", message), message


@pytest.mark.parametrize("case", ["foreign-ca", "wrong-role"])
def test_bad_server_certificate_is_refused(
    case: str, session_ca: CertSet, rogue_ca: CertSet, tiny_cnn: TinyModel, party_run: PartyRun
) -> None:
    # Prepare: the model owner presents a certificate from another CA, or the dealer's
    if case == "foreign-ca":
        override = {"model-owner": rogue_ca}
    else:
        override = {
            "model-owner": CertSet(session_ca.ca, {"model-owner": session_ca.certs["dealer"]})
        }
    model_port = free_port()
    write_session(
        party_run.config,
        session_ca,
        {"model-owner": model_port, "dealer": free_port()},
        connect_timeout_s=REFUSED_CONNECT_TIMEOUT_S,
        override=override,
    )
    # Execute: `privmed party` checks its own certificate's role at start, so with the dealer's
    # certificate a program that does not check (below: a bare TLS server) plays the vendor
    party_run.start("model-owner", "--model", tiny_cnn.onnx)
    rogue = _bare_tls_server(override["model-owner"], model_port) if case == "wrong-role" else None
    party_run.start(
        "data-owner", "--input", tiny_cnn.input, "--output", party_run.workdir / "out.npy"
    )
    party_run.wait_exits(("data-owner", "model-owner"), REFUSED_CONNECT_TIMEOUT_S + 3 * MARGIN_S)
    if rogue is not None:
        rogue.join(5)
    # Assert: the data owner refuses at the handshake and says why, naming model-owner
    assert party_run.code("data-owner") == 2, party_run.report()
    message = party_run.message("data-owner")
    assert "model-owner" in message and str(model_port) in message, message
    assert re.search(r"(?i)certificate", message), message
    assert party_run.code("model-owner") == 2, party_run.report()
    if case == "wrong-role":
        assert party_run.message("model-owner").endswith(
            "a certificate for 'dealer', not for model-owner; a model-owner needs a model-owner certificate"
        ), party_run.report()
    assert not (party_run.workdir / "out.npy").exists()


def _bare_tls_server(certs: CertSet, port: int) -> threading.Thread:
    """Accept one TLS connection on ``port`` presenting ``certs``' model-owner files (no role
    check of its own), for at most 20 s."""
    from privmed.crypto.certs import Identity
    from privmed.net.tls_listen import server_context, server_handshake

    cert, key = certs.certs["model-owner"]
    ctx = server_context(Identity("model-owner", cert, key, certs.ca))
    lsock = socket.create_server(("127.0.0.1", port))
    lsock.settimeout(20)

    def serve_once() -> None:
        try:
            raw, _ = lsock.accept()
            with contextlib.suppress(OSError):
                server_handshake(ctx, raw, 5).close()
            raw.close()
        except OSError:
            pass
        finally:
            lsock.close()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    return thread


def _silent_connections(port: int, count: int, timeout_s: float) -> list[socket.socket]:
    """``count`` TCP connections to a listener that is starting up, each saying nothing."""
    deadline, conns = time.monotonic() + timeout_s, []
    while len(conns) < count:
        try:
            conns.append(socket.create_connection(("127.0.0.1", port), timeout=1))
        except OSError:
            if time.monotonic() > deadline:
                pytest.fail(f"nothing listens on {port} after {timeout_s}s")
            time.sleep(0.05)
    return conns


def test_silent_connections_do_not_hold_up_the_session(
    session_ca: CertSet, tiny_cnn: TinyModel, party_run: PartyRun
) -> None:
    # Prepare: three connections that never speak TLS (port scanners) to each listener
    ports = {"model-owner": free_port(), "dealer": free_port()}
    write_session(party_run.config, session_ca, ports, connect_timeout_s=40)
    party_run.start("dealer")
    party_run.start("model-owner", "--model", tiny_cnn.onnx)
    silent = [c for port in ports.values() for c in _silent_connections(port, 3, 60)]
    try:
        # Execute
        party_run.start("data-owner", "--input", tiny_cnn.input, "--output", party_run.workdir / "out.npy")
        party_run.wait_exits(ROLES, 60)
    finally:
        for c in silent:
            c.close()
    # Assert: a handshake waits at most 10 s for its peer; six silent ones in a row would
    # take a blocking listener a minute, here nobody waits for them
    for role in ROLES:
        assert party_run.code(role) == 0, party_run.report()
    assert party_run.lifetime("data-owner") < 9.0, party_run.report()
    np.testing.assert_allclose(np.load(party_run.workdir / "out.npy"), tiny_cnn.expected, atol=ATOL, rtol=0)


# -- 7. a port already in use -----------------------------------------------------------------------


def test_port_in_use_fails_at_once(
    session_ca: CertSet, tiny_cnn: TinyModel, party_run: PartyRun
) -> None:
    # Prepare: both listening ports are taken by sockets of ours
    with hold_port(listen=True) as model_port, hold_port(listen=True) as dealer_port:
        write_session(
            party_run.config,
            session_ca,
            {"model-owner": model_port, "dealer": dealer_port},
            connect_timeout_s=30,
        )
        # Execute
        party_run.start("model-owner", "--model", tiny_cnn.onnx)
        party_run.start("dealer")
        party_run.wait_exits(("model-owner", "dealer"), 20)
    # Assert: at once (not after connect_timeout_s = 30), naming the role and the port
    for role, port in (("model-owner", model_port), ("dealer", dealer_port)):
        assert party_run.code(role) == 2, party_run.report()
        message = party_run.message(role)
        assert role in message and str(port) in message and "in use" in message, message
        assert party_run.lifetime(role) < 10, f"{role} took {party_run.lifetime(role):.1f}s"


def test_port_of_a_finished_session_can_be_reused(session_ca: CertSet, party_run: PartyRun) -> None:
    # Prepare: the dealer's port served a connection that the server end closed (TIME_WAIT)
    port = time_wait_port()
    write_session(
        party_run.config,
        session_ca,
        {"model-owner": free_port(), "dealer": port},
        connect_timeout_s=2,
    )
    # Execute: the dealer alone, nobody comes
    party_run.start("dealer")
    party_run.wait_exits(("dealer",), 2 + 2 * MARGIN_S)
    # Assert: it listened and timed out waiting, rather than failing to bind
    message = party_run.message("dealer")
    assert "in use" not in message and "did not connect" in message, message


# -- other deployment mistakes ------------------------------------------------------------------------


def test_data_owner_input_rejected_after_plan_tells_everyone(
    session_ca: CertSet, tiny_cnn: TinyModel, party_run: PartyRun
) -> None:
    # Prepare: in deployment only the model owner has the model, so the data owner learns the
    # input shape from the public plan and must abort the session for everyone
    wrong = party_run.workdir / "wrong.npy"
    np.save(wrong, np.zeros((1, 1, 20, 20), np.float32))
    write_session(party_run.config, session_ca, {"model-owner": free_port(), "dealer": free_port()})
    # Execute
    party_run.start("dealer")
    party_run.start("model-owner", "--model", tiny_cnn.onnx)
    party_run.start("data-owner", "--input", wrong, "--output", party_run.workdir / "out.npy")
    party_run.wait_exits(ROLES, 40)
    # Assert
    for role in ROLES:
        assert party_run.code(role) == 2, party_run.report()
        message = party_run.message(role)
        assert "(1, 1, 20, 20)" in message and "1, 16, 16" in message, message
        if role != "data-owner":
            assert "data-owner" in message, message
    assert not (party_run.workdir / "out.npy").exists()


@pytest.mark.parametrize("mistake", ["no-session-file", "missing-key", "no-port"])
def test_session_file_mistakes(mistake: str, session_ca: CertSet, tmp_path: Path) -> None:
    # Prepare
    config = tmp_path / "session.toml"
    write_session(config, session_ca, {"model-owner": free_port(), "dealer": free_port()})
    text = config.read_text()
    if mistake == "no-session-file":
        config.unlink()
        expect = [r"session\.toml", r"not found"]
    elif mistake == "missing-key":
        config.write_text(
            text.replace(str(session_ca.certs["dealer"][1]), str(tmp_path / "gone.key"))
        )
        expect = [r"dealer", r"gone\.key"]
    else:
        config.write_text(re.sub(r"(\[dealer\][^\[]*?)port = \d+\n", r"\1", text))
        expect = [r"\[dealer\]", r"port"]
    # Execute
    done = run_privmed("party", "--role", "dealer", "--config", config, timeout_s=30)
    # Assert
    assert done.returncode == 2, done.report()
    message = error_message(done.stderr, done.report())
    for pattern in expect:
        assert re.search(pattern, message), f"{pattern!r} not in: {message}"
