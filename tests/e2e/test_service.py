"""Inference as a service: `privmed serve model-owner` and `privmed serve dealer` as real
long-running processes, hospitals as `privmed infer --service` processes, all over mutual TLS
1.3 on 127.0.0.1; every organisation's key made on its own "host" folder by a certificate
request that the consortium CA signs.

Claims tested: sessions run concurrently up to ``max_sessions`` and one more is refused as busy
at once (``--busy-wait`` retries until a slot frees; ``max_sessions_per_peer`` caps one
certificate); a hospital killed, hung or sending a malformed or oversized frame mid-session ends
only its own session; the dealer killed mid-session fails that session naming the dealer, and
restarted serves the next; SIGTERM finishes running sessions and refuses new ones; a data owner
cannot join another hospital's session; a certificate of the wrong role, or a hospital off the
allow-list, is refused with a one-line reason; handshake messages that break the schema end
only that connection; the metrics endpoint counts what the audit log records. The processes
are started by ``service_harness``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from privmed.errors import PeerError
from privmed.net.channel import FailureGroup
from privmed.runtime import service_wire as wire

from .conftest import TinyModel, error_message
from .service_harness import (
    MAX_FRAME_MB,
    START_S,
    Deployment,
    Proc,
    channel_to,
    check_output,
    deploy,
    port_of,
    request_model,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory, slow_cnn: TinyModel) -> Iterator[Deployment]:
    """One vendor service (at most 2 sessions) and one dealer service for the module's tests."""
    dep = deploy(tmp_path_factory.mktemp("service"), slow_cnn, max_sessions=2)
    try:
        yield dep
    finally:
        dep.stop()


def test_two_sessions_run_concurrently_and_a_third_is_refused_busy(services: Deployment) -> None:
    # Prepare: a silent TCP connection to each service (a port scanner) must delay nobody
    before = len(services.audit("vendor"))
    silent = [socket.create_connection(("127.0.0.1", port_of(services, o)), timeout=5) for o in ("vendor", "helper")]
    try:
        # Execute: two hospitals at once; when both compute, a third request
        a = services.hospital("st-mary", "a", images=5)
        b = services.hospital("northfield", "b", images=5)
        a.wait_text("secure inference:", 60, "err")
        b.wait_text("secure inference:", 60, "err")
        c = services.hospital("st-mary", "c")
        code_c = c.wait(60)
        latency = time.monotonic() - c.started
        # Assert: the third is refused as busy, in one line, and the two others are right
        assert code_c == 2, c.report()
        msg = error_message(c.err(), c.report())
        assert "model-owner at 127.0.0.1" in msg and "refused the session (busy)" in msg and "2 of 2 sessions" in msg, msg
        assert latency < 20, f"busy refusal took {latency:.1f}s"
        check_output(services, a, images=5)
        check_output(services, b, images=5)
    finally:
        for s in silent:
            s.close()
    audit = services.wait_audit("vendor", lambda rs: sum(r.get("outcome") == "ok" for r in rs[before:]) >= 2)
    records = [r for r in audit if r.get("outcome") == "ok"]
    ok = {r["peer"]["org"]: r for r in records if r["images"] == 5}
    assert set(ok) == {"St Mary Hospital", "Northfield Clinic"}, records
    first, second = sorted(ok.values(), key=lambda r: r["time"])
    assert second["time"] < first["end"], f"the sessions did not overlap: {first} {second}"
    for r in ok.values():
        assert r["images"] == 5 and r["model"] == "slow" and r["plan"] == records[-1]["plan"] and r["bytes_sent"] > 0, r
        assert len(r["session"]) == 32
    assert ok["St Mary Hospital"]["session"] != ok["Northfield Clinic"]["session"]
    busy = [r for r in audit if r.get("code") == "busy"]
    assert busy and busy[-1]["peer"]["org"] == "St Mary Hospital", audit
    sessions = {r["session"] for r in ok.values()}
    helper = services.wait_audit("helper", lambda rs: sessions <= {r.get("session") for r in rs})
    dealer_ok = {r["session"] for r in helper if r.get("outcome") == "ok"}
    assert {r["session"] for r in ok.values()} <= dealer_ok


def test_busy_wait_retries_until_a_slot_frees(services: Deployment) -> None:
    from privmed.runtime.config import load_config
    from privmed.runtime.service_client import open_session

    # Prepare: both slots held by sessions opened in this process (they wait for a batch)
    cfg = load_config(services.orgs.base / "st-mary" / "session.toml")
    held = [open_session(cfg, "slow", None, FailureGroup()) for _ in range(2)]
    try:
        # Execute: a job that may wait for a slot; free the slots once it was refused
        patient = services.hospital("northfield", "patient", 1, "--busy-wait", "60")
        patient.wait_text("retrying (--busy-wait 60)", 60, "err")
    finally:
        for _sid, to_model, to_dealer in held:
            to_model.close(flush_s=1.0)
            to_dealer.close(flush_s=1.0)
    # Assert: it said why it waits, then ran and got the right output
    check_output(services, patient)
    first = patient.err().splitlines()[0]
    assert first == "model-owner service is busy (2 of 2 sessions running); try again later; retrying (--busy-wait 60)", first


def test_a_hospital_killed_mid_session_ends_only_its_own_session(services: Deployment) -> None:
    # Prepare: two sessions running
    a = services.hospital("st-mary", "killed", images=5)
    b = services.hospital("northfield", "survivor", images=2)
    a.wait_text("secure inference:", 60, "err")
    b.wait_text("secure inference:", 60, "err")
    # Execute
    a.kill()
    # Assert: the other hospital's session completes correctly; the services log the loss
    check_output(services, b, images=2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        failed = [r for r in services.audit("vendor") if r.get("outcome") == "failed" and r["peer"]["org"] == "St Mary Hospital"]
        if failed:
            break
        time.sleep(0.2)
    assert failed and "data-owner" in failed[-1]["error"], services.audit("vendor")
    assert services.vendor.popen.poll() is None and services.helper.popen.poll() is None


def test_a_data_owner_cannot_join_another_hospitals_session(services: Deployment) -> None:
    # Prepare: St Mary asks the vendor for a session and learns its id
    st_mary, northfield = services.orgs.ident("st-mary"), services.orgs.ident("northfield")
    to_model = channel_to(st_mary, "model-owner", port_of(services, "vendor"))
    wire.send(to_model, wire.REQUEST, model="slow", plan="")
    granted = wire.receive(to_model, wire.REPLY, 15)
    assert granted["ok"] and len(granted["session"]) == 32, granted
    try:
        # Execute: Northfield presents that id at the dealer; then an id nobody opened
        replies = []
        for sid in (granted["session"], os.urandom(16).hex()):
            ch = channel_to(northfield, "dealer", port_of(services, "helper"))
            wire.send(ch, wire.JOIN, session=sid)
            replies.append(wire.receive(ch, wire.REPLY, 15))
            ch.close(flush_s=1.0)
        # St Mary can still join its own session afterwards
        own = channel_to(st_mary, "dealer", port_of(services, "helper"))
        wire.send(own, wire.JOIN, session=granted["session"])
        joined = wire.receive(own, wire.REPLY, 15)
        own.close(flush_s=1.0)
    finally:
        to_model.close(flush_s=1.0)
    # Assert
    assert replies[0]["ok"] is False and replies[0]["code"] == "not-allowed", replies[0]
    assert "another data owner" in replies[0]["error"]
    assert replies[1]["ok"] is False and replies[1]["code"] == "unknown-session", replies[1]
    assert joined["ok"] is True and joined["session"] == granted["session"], joined


def test_wrong_role_certificates_are_refused(services: Deployment, tmp_path: Path) -> None:
    # Execute 1: the vendor's own certificate knocks on the vendor as if it were a hospital
    vendor = services.orgs.ident("vendor")
    ch = channel_to(vendor, "model-owner", port_of(services, "vendor"))
    wire.send(ch, wire.REQUEST, model="slow", plan="")
    with pytest.raises(PeerError, match="refused a certificate issued to 'model-owner'; expected data-owner"):
        wire.receive(ch, wire.REPLY, 15)
    ch.close(flush_s=1.0)
    # Execute 2: a hospital certificate asks the dealer to open a session (what vendors do)
    ch = channel_to(services.orgs.ident("st-mary"), "dealer", port_of(services, "helper"))
    wire.send(ch, wire.OPEN, session=os.urandom(16).hex(), data_owner="sha256:" + "0" * 64, model="slow", plan="")
    with pytest.raises(PeerError):  # the dealer expects only svc/join from a data owner: it hangs up
        wire.receive(ch, wire.REPLY, 15)
    ch.close(flush_s=1.0)
    # Execute 3: a hospital's certificate used to start a dealer service
    hospital = services.orgs.base / "st-mary"
    toml = (services.orgs.base / "helper" / "service.toml").read_text()
    (hospital / "dealer.toml").write_text(toml.replace('"dealer.pem"', '"data-owner.pem"').replace('"dealer.key"', '"data-owner.key"')
                                          .replace(f"port = {port_of(services, 'helper')}", "port = 0"))
    bad = Proc("bad-dealer", hospital, ["serve", "dealer", "--config", "dealer.toml"])
    # Assert
    assert bad.wait(60) == 2, bad.report()
    msg = error_message(bad.err(), bad.report())
    assert msg == "data-owner.pem: a certificate for 'data-owner' (St Mary Hospital), not for dealer; a dealer service needs a dealer certificate", msg
    helper = services.wait_audit("helper", lambda rs: any("svc/open" in r.get("error", "") for r in rs))
    hospital_at_dealer = [r for r in helper if r["peer"]["org"] == "St Mary Hospital" and "session" not in r]
    assert "tag 'svc/open', expected 'svc/join'" in hospital_at_dealer[-1]["error"], helper


def test_a_hospital_off_the_allow_list_is_refused_in_one_line(services: Deployment) -> None:
    # Execute
    proc = services.hospital("outsider", "outsider")
    code = proc.wait(60)
    # Assert
    assert code == 2, proc.report()
    msg = error_message(proc.err(), proc.report())
    assert msg.startswith("model-owner at 127.0.0.1:") and "refused the connection: model-owner does not admit 'Unlisted Clinic'" in msg, msg
    assert msg.endswith("not on its allow-list"), msg
    assert not (proc.cwd / "outsider.npy").exists()
    audit = services.wait_audit("vendor", lambda rs: any(r["peer"]["org"] == "Unlisted Clinic" for r in rs))
    record = [r for r in audit if r["peer"]["org"] == "Unlisted Clinic"][-1]
    assert record["outcome"] == "refused" and record["code"] == "not-allowed", record


def test_a_request_that_breaks_the_schema_ends_only_that_connection(services: Deployment) -> None:
    # Execute: an extra field, then a model name that is a path
    errors = []
    for fields in ({"model": "slow", "plan": "", "debug": True}, {"model": "../../etc/passwd", "plan": ""}):
        before = len(services.audit("vendor"))
        ch = channel_to(services.orgs.ident("northfield"), "model-owner", port_of(services, "vendor"))
        ch.send_text(wire.REQUEST, json.dumps(fields))
        with pytest.raises(PeerError):  # the service hangs up without a reply
            wire.receive(ch, wire.REPLY, 15)
        ch.close(flush_s=1.0)
        audit = services.wait_audit("vendor", lambda rs, n=before: len(rs) > n)
        errors.append([r for r in audit if r["peer"]["org"] == "Northfield Clinic"][-1]["error"])
    # Assert: named in the audit log; the service still serves
    assert "svc/request with fields" in errors[0] and "'debug'" in errors[0], errors
    assert "invalid 'model'" in errors[1], errors
    ok = services.hospital("northfield", "after-bad")
    check_output(services, ok)


@pytest.mark.parametrize(
    ("bad_batch", "error"),
    [
        (np.ones(1, np.float64), "unexpected message from data-owner: dtype float64, expected int64"),
        (np.zeros((MAX_FRAME_MB << 20) + 1, np.uint8),
         f"data-owner sent a frame of {(MAX_FRAME_MB << 20) + 1} bytes (tag 'batch'); at most {MAX_FRAME_MB << 20} are accepted here"),
    ],
    ids=["wrong-dtype", "oversized"],
)
def test_a_bad_frame_mid_session_ends_only_that_session(services: Deployment, bad_batch: np.ndarray, error: str) -> None:
    from privmed.runtime.config import load_config
    from privmed.runtime.service_client import open_session

    # Prepare: an honest hospital's job running, and a second session opened in this process
    honest = services.hospital("st-mary", "honest", images=3)
    honest.wait_text("secure inference:", 60, "err")
    cfg = load_config(services.orgs.base / "northfield" / "session.toml")
    sid, to_model, to_dealer = open_session(cfg, "slow", None, FailureGroup())
    try:
        to_model.recv_text("plan", 1 << 20)
        # Execute: a batch size the vendor must refuse (wrong dtype, or larger than max_frame_mb)
        to_model.send("batch", bad_batch)
        # (an oversized frame is refused while it still arrives: the vendor's abort may be lost
        # in the reset of a connection closed with unread data; its audit line says why below)
        with pytest.raises(PeerError, match="model-owner aborted the session|lost connection to model-owner"):
            to_model.recv("anything", np.uint8, (1,), timeout_s=15)
    finally:
        to_model.close(flush_s=1.0)
        to_dealer.close(flush_s=1.0)
    # Assert: the honest job is unaffected; the vendor's audit names the bad session's cause
    check_output(services, honest, images=3)
    bad = [r for r in services.wait_audit("vendor", lambda rs: any(r.get("session") == sid for r in rs)) if r.get("session") == sid]
    assert bad and bad[0]["outcome"] == "failed" and error in bad[0]["error"], bad


def test_the_metrics_endpoint_counts_what_the_audit_log_records(services: Deployment) -> None:
    # Prepare: one more completed job and one refusal, both in the audit log
    ok_before = sum(r.get("outcome") == "ok" for r in services.audit("vendor"))
    check_output(services, services.hospital("northfield", "counted"))
    ch = channel_to(services.orgs.ident("northfield"), "model-owner", port_of(services, "vendor"))
    wire.send(ch, wire.REQUEST, model="nonexistent", plan="")
    assert wire.receive(ch, wire.REPLY, 15)["code"] == "unknown-model"
    ch.close(flush_s=1.0)
    audit = services.wait_audit("vendor", lambda rs: sum(r.get("outcome") == "ok" for r in rs) > ok_before
                                and any(r.get("model") == "nonexistent" for r in rs))
    url = next(line.split(" on ", 1)[1] for line in services.vendor.out().splitlines() if "metrics on http" in line)
    # Execute (a service counts a session before appending its audit line)
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    # Assert: the text format, counts equal to the audit log's, no peer identity in any label
    ok = [r for r in audit if r.get("outcome") == "ok"]
    codes = {r["code"] for r in audit if r.get("outcome") == "refused"}
    values = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}
    assert values['privmed_sessions_total{model="slow",outcome="ok",service="model-owner"}'] == len(ok), text
    for code in codes:
        count = sum(r.get("code") == code for r in audit if r.get("outcome") == "refused")
        assert values[f'privmed_refusals_total{{code="{code}",service="model-owner"}}'] == count, (code, text)
    assert "unknown-model" in codes
    assert values['privmed_images_total{model="slow",service="model-owner"}'] == sum(r["images"] for r in ok)
    assert values['privmed_session_slots{service="model-owner"}'] == 2
    assert values['privmed_sessions_active{service="model-owner"}'] == 0
    assert "St Mary" not in text and "sha256" not in text and "127.0.0.1" not in text


def test_sigterm_finishes_running_sessions_and_refuses_new_ones(tmp_path: Path, slow_cnn: TinyModel) -> None:
    dep = deploy(tmp_path, slow_cnn, max_sessions=2, per_peer=1)
    try:
        # Prepare: one session running; with one slot per certificate, St Mary's second request
        # is refused while Northfield's is admitted
        a = dep.hospital("st-mary", "running", images=3)
        a.wait_text("secure inference:", 60, "err")
        second, other = request_model(dep, "st-mary"), request_model(dep, "northfield")
        assert second["code"] == "busy" and "busy for this certificate (1 of at most 1 sessions per peer" in second["error"], second
        assert other["ok"] is True, other
        # Execute: SIGTERM to both services, then a new request
        dep.vendor.kill(signal.SIGTERM)
        dep.helper.kill(signal.SIGTERM)
        dep.vendor.wait_text("refusing new sessions", 10)
        late = channel_to(dep.orgs.ident("northfield"), "model-owner", port_of(dep, "vendor"))
        wire.send(late, wire.REQUEST, model="slow", plan="")
        refusal = wire.receive(late, wire.REPLY, 15)
        late.close(flush_s=1.0)
        # Assert: the late one is refused, the running one completes, both services exit 0
        assert a.popen.poll() is None, "the running session ended before the late request: no drain was tested"
        assert refusal["ok"] is False and refusal["code"] == "shutting-down", refusal
        # both services are draining: whichever of the two refuses first answers (under load the
        # vendor may already have asked the dealer for a session when its own flag is read)
        assert refusal["error"] in ("model-owner service is shutting down; try again later",
                                    "the dealer refused the session: dealer service is shutting down; try again later"), refusal
        check_output(dep, a, images=3)
        assert dep.vendor.wait(30) == 0, dep.vendor.report()
        assert dep.helper.wait(30) == 0, dep.helper.report()
        assert "model-owner service stopped" in dep.vendor.out()
        outcomes = [(r["peer"]["org"], r["outcome"]) for r in dep.audit("vendor")]
        assert ("St Mary Hospital", "ok") in outcomes and ("Northfield Clinic", "refused") in outcomes, outcomes
    finally:
        dep.stop()


def test_a_hospital_that_hangs_is_dropped_after_timeout_s_while_another_completes(tmp_path: Path, slow_cnn: TinyModel) -> None:
    timeout_s = 4.0
    dep = deploy(tmp_path, slow_cnn, max_sessions=2, timeout_s=timeout_s)
    try:
        # Prepare: two sessions running
        hung = dep.hospital("st-mary", "hung", images=4)
        other = dep.hospital("northfield", "other", images=4)
        hung.wait_text("secure inference:", 60, "err")
        other.wait_text("secure inference:", 60, "err")
        # Execute: one hospital's process stops (SIGSTOP: its connections stay open, silent)
        hung.kill(signal.SIGSTOP)
        stopped_at = time.monotonic()
        # Assert: the other completes; the vendor gives up on the hung one after about timeout_s
        check_output(dep, other, images=4)
        deadline = stopped_at + timeout_s + 20
        failed: list[dict] = []
        while not failed and time.monotonic() < deadline:
            failed = [r for r in dep.audit("vendor") if r.get("outcome") == "failed"]
            time.sleep(0.2)
        elapsed = time.monotonic() - stopped_at
        assert failed and failed[0]["peer"]["org"] == "St Mary Hospital", dep.audit("vendor")
        assert f"data-owner did not send a message within {timeout_s:.0f}s" in failed[0]["error"], failed[0]
        assert timeout_s - 0.5 < elapsed < timeout_s + 15, f"dropped after {elapsed:.1f}s"
        assert dep.vendor.popen.poll() is None
    finally:
        dep.stop()


def test_dealer_restarted_mid_session_fails_that_session_naming_the_dealer_and_new_ones_succeed(
    tmp_path: Path, slow_cnn: TinyModel
) -> None:
    dep = deploy(tmp_path, slow_cnn, max_sessions=2)
    try:
        # Prepare: a session running
        a = dep.hospital("st-mary", "cut", images=5)
        a.wait_text("secure inference:", 60, "err")
        # Execute: the dealer's process dies; an operator restarts it on the same port
        dep.helper.kill()
        dep.helper.popen.wait(10)
        code_a = a.wait(60)
        dep.helper = Proc("dealer-2", dep.orgs.base / "helper", ["serve", "dealer", "--config", "service.toml"])
        dep.helper.wait_text("listening on", START_S)
        b = dep.hospital("northfield", "after-restart")
        # Assert: the cut session fails in one line that names the dealer; the next one is right
        assert code_a == 2, a.report()
        msg = error_message("\n".join(ln for ln in a.err().splitlines() if not ln.startswith("secure inference:")), a.report())
        assert "lost connection to dealer" in msg, msg
        check_output(dep, b)
        failed = [r for r in dep.audit("vendor") if r.get("outcome") == "failed"]
        assert len(failed) == 1 and "dealer" in failed[0]["error"], dep.audit("vendor")
        assert dep.vendor.popen.poll() is None
    finally:
        dep.stop()
