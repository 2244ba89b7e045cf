"""A real Orthanc PACS for the tests, alone in a network namespace with only loopback up.

Orthanc listens on every interface and has no bind option, so it runs under
``unshare --net`` (a network namespace of its own: ``lo`` only, nothing reachable from
outside, no port clash with other jobs on the machine); privmed's commands join that
namespace with ``nsenter --net=/proc/PID/ns/net``. Orthanc keeps its database in a
temporary folder and is stopped (SIGTERM, then SIGKILL) at teardown.

``orthanc_or_skip`` skips with the reason when Orthanc (Debian package ``orthanc``,
installed by ``.ci/run``) or namespaces (root / CAP_SYS_ADMIN) are not available. With the
``orthanc-dicomweb`` package, Orthanc also serves DICOMweb at ``http://127.0.0.1:8042/dicom-web``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import ENV, PRIVMED

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian orthanc-dicomweb
DICOM_PORT, HTTP_PORT = 4242, 8042  # inside the namespace: nothing else is there
AET = "ORTHANC"


@dataclass
class Orthanc:
    process: subprocess.Popen
    workdir: Path

    @property
    def netns(self) -> str:
        return f"/proc/{self.process.pid}/ns/net"

    @property
    def dicomweb_args(self) -> list[str]:
        if not DICOMWEB_PLUGIN.is_file():
            pytest.skip("Orthanc's DICOMweb plugin is not installed (Debian package orthanc-dicomweb; .ci/run installs it)")
        return ["--dicomweb", f"http://127.0.0.1:{HTTP_PORT}/dicom-web", "--pacs-timeout", "20"]

    @property
    def pacs_args(self) -> list[str]:
        return ["--pacs", f"127.0.0.1:{DICOM_PORT}", "--pacs-aet", AET, "--pacs-timeout", "20"]

    def run(self, args: list[str | Path], timeout: float = 300.0) -> subprocess.CompletedProcess:
        """``privmed ARGS`` inside Orthanc's namespace (where 127.0.0.1:4242 is Orthanc)."""
        cmd = ["nsenter", f"--net={self.netns}", *PRIVMED, *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout, check=False)

    def log(self) -> str:
        path = self.workdir / "Orthanc.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no Orthanc.log)"


def orthanc_or_skip() -> None:
    if not Path(ORTHANC).is_file():
        pytest.skip("Orthanc is not installed (Debian package orthanc; .ci/run installs it)")
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found (util-linux / iproute2)")
    probe = subprocess.run(["unshare", "--net", "--", "ip", "link", "set", "lo", "up"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace for Orthanc: {probe.stderr.strip()}")


def start_orthanc(
    workdir: Path, deadline_s: float = 60.0, extra_config: dict | None = None, probe: list[str] | None = None
) -> Orthanc:
    """Start Orthanc in its own namespace and wait until it answers C-ECHO through privmed.

    ``extra_config`` adds to / overrides Orthanc's configuration (e.g. DICOM TLS); ``probe``
    are the ``privmed pacs echo`` arguments that reach it (default ``pacs_args``).
    """
    orthanc_or_skip()
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "db").mkdir(exist_ok=True)
    config = {
        "Name": "privmed-test", "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
        "DicomAet": AET, "DicomPort": DICOM_PORT, "HttpPort": HTTP_PORT, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": True, "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True,
        "DicomModalities": {}, "ConcurrentJobs": 1,
        "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.is_file() else [],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    config.update(extra_config or {})
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=1))
    script = f"ip link set lo up && exec {ORTHANC} --logdir={workdir} {workdir / 'orthanc.json'}"
    # unshare and sh exec into Orthanc: the child's pid is Orthanc's, its namespace ours to join
    proc = subprocess.Popen(["unshare", "--net", "--", "sh", "-c", script], stdout=subprocess.DEVNULL,
                            stderr=open(workdir / "stderr.txt", "wb"))  # noqa: SIM115 - closed with the process  # fmt: skip
    server = Orthanc(proc, workdir)
    t0, last = time.monotonic(), ""
    while time.monotonic() - t0 < deadline_s:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}: {server.log()}")
        res = server.run(["pacs", "echo", *(probe or server.pacs_args)], timeout=30)
        if res.returncode == 0:
            return server
        last = res.stderr.strip()
        time.sleep(0.5)
    stop_orthanc(server)
    raise RuntimeError(f"Orthanc did not answer C-ECHO within {deadline_s} s: {last}\n{server.log()}")


def stop_orthanc(server: Orthanc) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(timeout=15)
