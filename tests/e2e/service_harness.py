"""Processes for the service tests: organisations with their own keys, the two services, hospital jobs.

``make_orgs`` makes a consortium CA and, per organisation folder, a key by certificate request
and its signed certificate (in-process: fast); ``deploy`` writes the service and session files
and starts `privmed serve dealer` and `privmed serve model-owner` (one model, ``slow``);
``Deployment.hospital`` starts a `privmed infer --service` job; ``Deployment.wait_audit`` reads
a service's audit log once it holds what a test waits for. Every process has a deadline and is
killed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from privmed.crypto.certs import Identity, init_ca
from privmed.crypto.csr import fingerprint_file, request, sign
from privmed.net.tls import TlsChannel, connect
from privmed.runtime import service_wire as wire

from .conftest import ENV, PRIVMED, TinyModel, free_port

ATOL = 1e-3  # 16 fractional bits, a few layers, then softmax (as in test_party_deploy)
START_S = 60.0  # a service's start (imports, compiling the model) on 2 busy cores
MAX_FRAME_MB = 16  # above every frame of the models here (slow_cnn's largest is well under 1 MB)
ORGS = {  # folder -> (role, organisation)
    "vendor": ("model-owner", "Acme Imaging AI"),
    "helper": ("dealer", "Regional Health IT"),
    "st-mary": ("data-owner", "St Mary Hospital"),
    "northfield": ("data-owner", "Northfield Clinic"),
    "outsider": ("data-owner", "Unlisted Clinic"),
}


@dataclass(frozen=True)
class Orgs:
    base: Path
    ca: Path

    def ident(self, org: str) -> Identity:
        role = ORGS[org][0]
        d = self.base / org
        return Identity(role, d / f"{role}.pem", d / f"{role}.key", d / "ca.pem")


def make_orgs(base: Path) -> Orgs:
    """A consortium CA that signs each organisation's request; keys stay in their folders."""
    init_ca(base / "consortium")
    for org, (role, name) in ORGS.items():
        _key, csr = request(role, name, base / org)
        sign(base / "consortium", csr, role, base / org / f"{role}.pem")
        (base / org / "ca.pem").write_bytes((base / "consortium" / "ca.pem").read_bytes())
    return Orgs(base, base / "consortium" / "ca.pem")


def _service_toml(orgs: Orgs, org: str, port: int, *, max_sessions: int, allow: list[str], dealer_port: int | None,
                  timeout_s: float = 20, metrics_port: int | None = None, per_peer: int | None = None) -> Path:
    role = ORGS[org][0]
    lines = ["[service]", 'host = "127.0.0.1"', f"port = {port}", 'ca = "ca.pem"', f'cert = "{role}.pem"', f'key = "{role}.key"',
             f"max_sessions = {max_sessions}", f"timeout_s = {timeout_s}", "connect_timeout_s = 15", 'audit_log = "audit.jsonl"',
             "allow = [" + ", ".join(json.dumps(a) for a in allow) + "]"]  # fmt: skip
    if metrics_port is not None:
        lines.append(f'metrics = "127.0.0.1:{metrics_port}"')
    lines.append(f"max_frame_mb = {MAX_FRAME_MB}")
    if per_peer is not None:
        lines.append(f"max_sessions_per_peer = {per_peer}")
    if dealer_port is not None:
        lines += ["", "[dealer]", 'host = "127.0.0.1"', f"port = {dealer_port}"]
    path = orgs.base / org / "service.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _session_toml(orgs: Orgs, org: str, model_port: int, dealer_port: int) -> None:
    (orgs.base / org / "session.toml").write_text(
        f'[session]\nca = "ca.pem"\ntimeout_s = 20\nconnect_timeout_s = 15\n\n[data-owner]\ncert = "data-owner.pem"\nkey = "data-owner.key"\n\n'
        f'[model-owner]\nhost = "127.0.0.1"\nport = {model_port}\ncert = "-"\nkey = "-"\n\n'
        f'[dealer]\nhost = "127.0.0.1"\nport = {dealer_port}\ncert = "-"\nkey = "-"\n'
    )


@dataclass
class Proc:
    """One `privmed` process with stdout/stderr in files."""

    name: str
    cwd: Path
    argv: list[str]
    popen: subprocess.Popen = field(init=False)
    started: float = field(init=False)

    def __post_init__(self) -> None:
        with open(self.cwd / f"{self.name}.out", "wb") as out, open(self.cwd / f"{self.name}.err", "wb") as err:
            self.popen = subprocess.Popen(PRIVMED + self.argv, cwd=self.cwd, stdout=out, stderr=err, env=ENV, start_new_session=True)
        self.started = time.monotonic()

    def out(self) -> str:
        return (self.cwd / f"{self.name}.out").read_text(errors="replace")

    def err(self) -> str:
        return (self.cwd / f"{self.name}.err").read_text(errors="replace")

    def report(self) -> str:
        return f"--- {self.name}: exit {self.popen.poll()}\nstdout:\n{self.out()}\nstderr:\n{self.err()}"

    def wait_text(self, text: str, timeout_s: float, stream: str = "out") -> float:
        """Block until ``text`` appears in stdout (or stderr); returns the monotonic time."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in (self.out() if stream == "out" else self.err()):
                return time.monotonic()
            if self.popen.poll() is not None:
                pytest.fail(f"{self.name} exited before printing {text!r}\n{self.report()}")
            time.sleep(0.05)
        pytest.fail(f"{self.name} did not print {text!r} within {timeout_s}s\n{self.report()}")

    def wait(self, timeout_s: float) -> int:
        try:
            return self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} did not exit within {timeout_s}s\n{self.report()}")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            os.killpg(self.popen.pid, sig)


@dataclass
class Deployment:
    orgs: Orgs
    model: TinyModel
    vendor: Proc
    helper: Proc
    procs: list[Proc] = field(default_factory=list)

    def hospital(self, org: str, name: str, images: int = 1, *extra: str) -> Proc:
        """`privmed infer --service` on ``images`` copies of the model's input (one session of
        ``images`` batches: long enough for other requests to arrive while it runs)."""
        d = self.orgs.base / org
        np.save(d / f"{name}-in.npy", np.repeat(self.model.x, images, axis=0))
        proc = Proc(name, d, ["infer", "--service", "session.toml", "--model-name", "slow", "--input", f"{name}-in.npy",
                              "--output", f"{name}.npy", *extra])  # fmt: skip
        self.procs.append(proc)
        return proc

    def audit(self, org: str) -> list[dict]:
        return [json.loads(line) for line in (self.orgs.base / org / "audit.jsonl").read_text().splitlines()]

    def wait_audit(self, org: str, done: Callable[[list[dict]], bool], timeout_s: float = 20) -> list[dict]:
        """The audit log once ``done`` holds for it (a service writes a session's line after
        closing its connections, so a peer may see the end first); as it is after the timeout."""
        deadline = time.monotonic() + timeout_s
        while not done(records := self.audit(org)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return records

    def stop(self) -> None:
        for p in [*self.procs, self.vendor, self.helper]:
            p.kill()
            p.popen.wait(timeout=10)


def deploy(base: Path, model: TinyModel, *, max_sessions: int, timeout_s: float = 20, per_peer: int | None = None) -> Deployment:
    orgs = make_orgs(base)
    mport, dport = free_port(), free_port()
    allow = [fingerprint_file(orgs.ident("st-mary").cert), "O=Northfield Clinic"]
    _service_toml(orgs, "helper", dport, max_sessions=4, allow=["O=Acme Imaging AI"], dealer_port=None, timeout_s=timeout_s)
    _service_toml(orgs, "vendor", mport, max_sessions=max_sessions, allow=allow, dealer_port=dport, timeout_s=timeout_s,
                  metrics_port=free_port(), per_peer=per_peer)
    for org in ("st-mary", "northfield", "outsider"):
        _session_toml(orgs, org, mport, dport)
    (base / "vendor" / "slow.onnx").write_bytes(model.onnx.read_bytes())
    helper = Proc("dealer", base / "helper", ["serve", "dealer", "--config", "service.toml"])
    vendor = Proc("vendor", base / "vendor", ["serve", "model-owner", "--config", "service.toml", "--model", "slow=slow.onnx"])
    dep = Deployment(orgs, model, vendor, helper)
    try:
        helper.wait_text("listening on", START_S)
        vendor.wait_text("listening on", START_S)
    except BaseException:
        dep.stop()
        raise
    return dep


def check_output(dep: Deployment, proc: Proc, images: int = 1) -> None:
    assert proc.wait(90) == 0, proc.report()
    got = np.load(proc.cwd / f"{proc.name}.npy")
    np.testing.assert_allclose(got, np.repeat(dep.model.expected, images, axis=0), atol=ATOL, rtol=0)


def port_of(dep: Deployment, org: str) -> int:
    for line in (dep.orgs.base / org / "service.toml").read_text().splitlines():
        if line.startswith("port = "):
            return int(line.split("=")[1])
    raise AssertionError(org)


def channel_to(ident: Identity, peer: str, port: int) -> TlsChannel:
    return TlsChannel(ident.name, peer, bytes(16), connect(ident, peer, "127.0.0.1", port, 10), 15)


def request_model(dep: Deployment, org: str) -> dict:
    """One in-process request for the model (the connection is closed after the reply)."""
    ch = channel_to(dep.orgs.ident(org), "model-owner", port_of(dep, "vendor"))
    try:
        wire.send(ch, wire.REQUEST, model="slow", plan="")
        return wire.receive(ch, wire.REPLY, 15)
    finally:
        ch.close(flush_s=1.0)
