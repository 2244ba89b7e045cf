"""The service deployment of docs/deploy.md section 8 on three hosts: three Linux network
namespaces (hospital 10.77.0.1, vendor 10.77.0.2, helper 10.77.0.3) joined by a bridge in a
fourth, all created by this test (``unshare --net`` holders; nothing is added to the host's own
namespace, and everything disappears with the holder processes).

Followed literally: the consortium CA, each organisation's key made by `privmed certs request`
in its own folder, `privmed certs sign` for the role, the vendor's allow-list from `privmed
certs fingerprint`, the two services, the hospital's job. Skipped (with the reason) where
namespaces cannot be created; CI runs as root and runs it.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from .conftest import ENV, PRIVMED, TinyModel, run_privmed

pytestmark = pytest.mark.timeout(180)
HOSTS = {"hospital": "10.77.0.1", "vendor": "10.77.0.2", "helper": "10.77.0.3"}
ROLE = {"hospital": "data-owner", "vendor": "model-owner", "helper": "dealer"}
ORG = {"hospital": "St Mary Hospital", "vendor": "Acme Imaging AI", "helper": "Regional Health IT"}


def _sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)


@pytest.fixture
def namespaces() -> Iterator[dict[str, int]]:
    """host -> pid of a process holding that host's network namespace (plus ``switch``)."""
    for tool in ("unshare", "nsenter", "ip", "ss"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found (util-linux / iproute2)")
    probe = _sh("unshare", "--net", "--", "ip", "link", "add", "probe0", "type", "bridge")
    if probe.returncode != 0:
        pytest.skip(f"cannot create network namespaces with a bridge: {probe.stderr.strip()}")
    holders = {name: subprocess.Popen(["unshare", "--net", "--", "sleep", "170"]) for name in ("switch", *HOSTS)}
    try:
        pids = {name: p.pid for name, p in holders.items()}
        time.sleep(0.2)  # unshare has exec'd sleep inside its namespace

        def in_ns(name: str, *cmd: str) -> None:
            done = _sh("nsenter", f"--net=/proc/{pids[name]}/ns/net", *cmd)
            assert done.returncode == 0, f"{name}: {' '.join(cmd)}: {done.stderr}"

        in_ns("switch", "ip", "link", "add", "br0", "type", "bridge")
        in_ns("switch", "ip", "link", "set", "br0", "up")
        for host, addr in HOSTS.items():
            in_ns("switch", "ip", "link", "add", f"to-{host}", "type", "veth", "peer", "name", "eth0", "netns", str(pids[host]))
            in_ns("switch", "ip", "link", "set", f"to-{host}", "master", "br0", "up")
            in_ns(host, "ip", "addr", "add", f"{addr}/24", "dev", "eth0")
            in_ns(host, "ip", "link", "set", "eth0", "up")
            in_ns(host, "ip", "link", "set", "lo", "up")
        yield pids
    finally:
        for p in holders.values():
            p.kill()
            p.wait(timeout=10)


def _privmed_in(pid: int, cwd: Path, *args: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen(["nsenter", f"--net=/proc/{pid}/ns/net", *PRIVMED, *args], cwd=cwd, env=ENV,
                            stdout=open(out, "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115  # fmt: skip


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {text!r} from {path.name} (exit {proc.poll()}):\n{path.read_text(errors='replace')}")
        time.sleep(0.1)


def test_three_namespaces_follow_the_service_deployment_doc(tmp_path: Path, namespaces: dict[str, int], tiny_cnn: TinyModel) -> None:
    # Prepare 1: keys where they belong, certificates from the consortium CA (docs section 8)
    dirs = {name: tmp_path / name for name in ("consortium", *HOSTS)}
    for d in dirs.values():
        d.mkdir()
    assert run_privmed("certs", "init", "pki", cwd=dirs["consortium"]).returncode == 0
    requests = {h: subprocess.Popen([*PRIVMED, "certs", "request", "--role", ROLE[h], "--org", ORG[h]], cwd=dirs[h], env=ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for h in HOSTS}  # fmt: skip
    for h, p in requests.items():
        assert p.wait(60) == 0, f"{h}: {p.stderr.read() if p.stderr else ''}"
    for h in HOSTS:
        shutil.copy(dirs[h] / f"{ROLE[h]}.csr", dirs["consortium"] / f"{h}.csr")
        signed = run_privmed("certs", "sign", "pki", f"{h}.csr", "--role", ROLE[h], "--out", f"{h}.pem", cwd=dirs["consortium"])
        assert signed.returncode == 0, signed.report()
        shutil.copy(dirs["consortium"] / f"{h}.pem", dirs[h] / f"{ROLE[h]}.pem")
        shutil.copy(dirs["consortium"] / "pki" / "ca.pem", dirs[h] / "ca.pem")
    fingerprint = run_privmed("certs", "fingerprint", dirs["hospital"] / "data-owner.pem").stdout.split()[0]
    # Prepare 2: the service files and the hospital's session file, with the hosts' addresses
    common = 'ca = "ca.pem"\nmax_sessions = 2\ntimeout_s = 20\nconnect_timeout_s = 15\naudit_log = "audit.jsonl"\n'
    (dirs["vendor"] / "service.toml").write_text(
        f'[service]\nhost = "{HOSTS["vendor"]}"\nport = 7100\ncert = "model-owner.pem"\nkey = "model-owner.key"\n{common}'
        f'allow = ["{fingerprint}"]\n\n[dealer]\nhost = "{HOSTS["helper"]}"\nport = 7101\n')
    (dirs["helper"] / "service.toml").write_text(
        f'[service]\nhost = "{HOSTS["helper"]}"\nport = 7101\ncert = "dealer.pem"\nkey = "dealer.key"\n{common}allow = ["O=Acme Imaging AI"]\n')
    (dirs["hospital"] / "session.toml").write_text(
        '[session]\nca = "ca.pem"\ntimeout_s = 20\nconnect_timeout_s = 15\n\n[data-owner]\ncert = "data-owner.pem"\nkey = "data-owner.key"\n\n'
        f'[model-owner]\nhost = "{HOSTS["vendor"]}"\nport = 7100\ncert = "-"\nkey = "-"\n\n'
        f'[dealer]\nhost = "{HOSTS["helper"]}"\nport = 7101\ncert = "-"\nkey = "-"\n')
    shutil.copy(tiny_cnn.onnx, dirs["vendor"] / "chest.onnx")
    shutil.copy(tiny_cnn.input, dirs["hospital"] / "images.npy")
    # Execute: the helper's and the vendor's services, then the hospital's job
    helper = _privmed_in(namespaces["helper"], dirs["helper"], "serve", "dealer", "--config", "service.toml", out=dirs["helper"] / "out.log")
    vendor = _privmed_in(namespaces["vendor"], dirs["vendor"], "serve", "model-owner", "--config", "service.toml",
                         "--model", "chest=chest.onnx", out=dirs["vendor"] / "out.log")  # fmt: skip
    try:
        _wait_for(dirs["helper"] / "out.log", "listening on 10.77.0.3:7101", helper, 60)
        _wait_for(dirs["vendor"] / "out.log", "listening on 10.77.0.2:7100", vendor, 60)
        job = _privmed_in(namespaces["hospital"], dirs["hospital"], "infer", "--service", "session.toml", "--model-name", "chest",
                          "--input", "images.npy", "--output", "probs.csv", out=dirs["hospital"] / "job.log")  # fmt: skip
        code = job.wait(90)
        listening = _sh("nsenter", f"--net=/proc/{namespaces['hospital']}/ns/net", "ss", "-Hltn").stdout.strip()
        for proc in (vendor, helper):
            proc.send_signal(signal.SIGTERM)
        codes = (vendor.wait(30), helper.wait(30))
    finally:
        for proc in (vendor, helper):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    # Assert: the right output at the hospital, which listens on nothing; both services stop cleanly
    log = (dirs["hospital"] / "job.log").read_text()
    assert code == 0, log
    rows = [line.split(",") for line in (dirs["hospital"] / "probs.csv").read_text().splitlines()[1:]]
    np.testing.assert_allclose(np.array([[float(v) for v in r[1:]] for r in rows]), tiny_cnn.expected, atol=1e-3, rtol=0)
    assert listening == "", f"the hospital listens: {listening}"
    assert codes == (0, 0), (dirs["vendor"] / "out.log").read_text() + (dirs["helper"] / "out.log").read_text()
    assert "St Mary Hospital" in (dirs["vendor"] / "audit.jsonl").read_text()
    assert '"address": "10.77.0.1:' in (dirs["vendor"] / "audit.jsonl").read_text()
    assert not (dirs["consortium"] / "hospital.key").exists() and (dirs["hospital"] / "data-owner.key").stat().st_mode & 0o077 == 0
