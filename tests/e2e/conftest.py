"""Shared fixtures for end-to-end tests of the secure-inference CLI (``privmed infer/party/certs``).

Everything here runs the real CLI in real subprocesses: parties talk TCP + mutual TLS 1.3 on
127.0.0.1, every subprocess has a deadline, and every party's stderr is kept so that a failing
assertion can show what each party said (``PartyRun.report``).

Reusable pieces:

- ``export_cnn`` / ``tiny_cnn`` / ``slow_cnn``: small torch CNNs exported to ONNX (opset 17)
  with an input ``.npy`` and onnxruntime's output as the oracle;
- ``unsupported_model``: an ONNX model with Sin, Cos and Atan nodes;
- ``session_ca`` / ``rogue_ca``: a CA and role certificates (``make_certs_cli``: the same
  through ``privmed certs init/issue``);
- ``write_session``: a ``session.toml`` for given ports, certificates and timeouts;
- ``run_privmed``, ``error_message``: run one command and check its one-line error;
- ``PartyRun``: start roles with ``privmed party``, follow progress, kill, time exits;
- ``free_port``, ``hold_port``, ``time_wait_port``: ports in known states.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

PRIVMED = [sys.executable, "-m", "privmed.cli.main"]
ROLES = ("data-owner", "model-owner", "dealer")
# 2 shared cores: one BLAS thread per party process keeps three parties from thrashing.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
CLI_TIMEOUT_S = 60.0  # hard cap for any single CLI call in these tests


# -- models --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TinyModel:
    """An exported ONNX model, an input file for it and onnxruntime's output on that input."""

    onnx: Path
    input: Path
    x: np.ndarray
    expected: np.ndarray
    onnx_nodes: tuple[str, ...]


def onnxruntime_output(model: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0])


def export_gated_vit(path: Path) -> Path:
    """MONAI's ViT (2 layers, hidden 48, 4 heads, a 3-class head, 32x32 input, 8x8 patches)
    behind an AttentionUnet-style gate x * sigmoid(conv(x)), seed 0, exported to ``path``
    (input "image"): LayerNorm, GELU, softmax inside, Q K^T and P V, the class token."""
    import torch
    from monai.networks.nets import ViT

    class GatedViT(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate = torch.nn.Conv2d(1, 1, 3, padding=1)
            self.vit = ViT(in_channels=1, img_size=(32, 32), patch_size=(8, 8), spatial_dims=2, hidden_size=48, mlp_dim=96,
                           num_layers=2, num_heads=4, classification=True, num_classes=3)  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.vit(x * torch.sigmoid(self.gate(x)))[0]

    torch.manual_seed(0)
    torch.onnx.export(GatedViT().eval(), torch.zeros(1, 1, 32, 32), str(path), opset_version=17, dynamo=False, input_names=["image"])
    return path


def export_cnn(
    directory: Path, *, channels: int, size: int, depth: int, batch: int, seed: int
) -> TinyModel:
    """Conv-ReLU stack, max-pool, stride-2 conv, global average pool, linear head, softmax.

    ``depth`` extra 3x3 conv+ReLU blocks at full resolution make the session longer and the
    dealer's traffic larger (fault tests need a run that lasts a while); every op is in the
    secure op set.
    """
    import onnx
    import torch

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(seed)
    layers: list[torch.nn.Module] = [torch.nn.Conv2d(1, channels, 3, padding=1), torch.nn.ReLU()]
    for _ in range(depth):  # at full resolution: many comparisons, megabytes of dealer traffic
        layers += [torch.nn.Conv2d(channels, channels, 3, padding=1), torch.nn.ReLU()]
    layers += [
        torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(channels, 3),
        torch.nn.Softmax(dim=1),
    ]
    net = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in net.parameters():  # He initialisation: activations keep their scale with depth
            std = (2.0 / (p[0].numel())) ** 0.5 if p.dim() > 1 else 0.1
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    x = torch.randn(batch, 1, size, size, generator=gen)
    directory.mkdir(parents=True, exist_ok=True)
    model = directory / "model.onnx"
    torch.onnx.export(
        net,
        (x,),
        str(model),
        opset_version=17,
        dynamo=False,
        input_names=["x"],
        output_names=["probs"],
        dynamic_axes={"x": {0: "n"}, "probs": {0: "n"}},
    )
    xs = x.numpy().astype(np.float32)
    np.save(directory / "x.npy", xs)
    names = tuple(n.name for n in onnx.load(str(model)).graph.node)
    return TinyModel(model, directory / "x.npy", xs, onnxruntime_output(model, xs), names)


@pytest.fixture(scope="session")
def tiny_cnn(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """1x16x16 input, batch 2: a whole `privmed infer` takes ~2 s."""
    return export_cnn(
        tmp_path_factory.mktemp("tiny_cnn"), channels=4, size=16, depth=0, batch=2, seed=0
    )


@pytest.fixture(scope="session")
def slow_cnn(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """1x64x64 input, 16 channels, 8 conv layers: an online phase of ~2-4 s over 20 layers and
    ~30 MB from the dealer, more than the socket buffers hold if a peer stops reading."""
    return export_cnn(
        tmp_path_factory.mktemp("slow_cnn"), channels=16, size=64, depth=6, batch=1, seed=1
    )


@pytest.fixture(scope="session")
def unsupported_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Conv -> Sin -> Cos -> Atan: three ops outside the secure op set (GELU and Tanh, used
    here before, are supported now)."""
    import torch

    class Unsupported(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.atan(torch.cos(torch.sin(self.conv(x))))

    directory = tmp_path_factory.mktemp("unsupported")
    x = torch.zeros(1, 1, 8, 8)
    model = directory / "unsupported.onnx"
    torch.onnx.export(
        Unsupported().eval(), (x,), str(model), opset_version=17, dynamo=False, input_names=["x"]
    )
    np.save(directory / "x.npy", x.numpy())
    return TinyModel(
        model, directory / "x.npy", x.numpy(), onnxruntime_output(model, x.numpy()), ()
    )


# -- running the CLI -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finished:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float

    def report(self) -> str:
        return f"$ privmed {' '.join(self.args)}\nexit {self.returncode} after {self.elapsed_s:.1f}s\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


def run_privmed(
    *args: str | Path, timeout_s: float = CLI_TIMEOUT_S, cwd: Path | None = None
) -> Finished:
    """Run ``privmed ARGS`` to completion (killed and failed after ``timeout_s``)."""
    argv = [str(a) for a in args]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            PRIVMED + argv, capture_output=True, text=True, timeout=timeout_s, env=ENV, cwd=cwd
        )
    except subprocess.TimeoutExpired as exc:  # its .stderr is bytes even with text=True
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr
        pytest.fail(
            f"privmed {' '.join(argv)} did not finish within {timeout_s}s (hang); stderr:\n{err}"
        )
    return Finished(argv, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def error_message(stderr: str, context: str = "") -> str:
    """The message of a one-line ``privmed: error: ...`` stderr; fails on tracebacks or extra lines."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert "Traceback" not in stderr, f"traceback in stderr:\n{stderr}\n{context}"
    assert len(lines) == 1, (
        f"expected exactly one line on stderr, got {len(lines)}:\n{stderr}\n{context}"
    )
    assert lines[0].startswith("privmed: error: "), (
        f"not a privmed error line: {lines[0]!r}\n{context}"
    )
    return lines[0][len("privmed: error: ") :]


# -- certificates and session files --------------------------------------------------------------


@dataclass(frozen=True)
class CertSet:
    """A CA and the certificate/key files it issued, per role."""

    ca: Path
    certs: dict[str, tuple[Path, Path]]


def make_certs(ca_dir: Path, roles: tuple[str, ...] = ROLES) -> CertSet:
    """A CA and one certificate per role (each in its own folder), made in-process: fast."""
    from privmed.crypto.certs import init_ca, issue

    init_ca(ca_dir)
    certs = {}
    for role in roles:
        ident = issue(ca_dir, role, ca_dir.parent / f"{ca_dir.name}-{role}")
        certs[role] = (ident.cert, ident.key)
    return CertSet(ca_dir / "ca.pem", certs)


def make_certs_cli(ca_dir: Path, roles: tuple[str, ...] = ROLES) -> CertSet:
    """The same with ``privmed certs init`` then ``privmed certs issue`` per role (in parallel)."""
    done = run_privmed("certs", "init", ca_dir)
    assert done.returncode == 0, done.report()
    assert "ca.pem" in done.stdout and "ca.key" in done.stdout, done.report()
    outs = {role: ca_dir.parent / f"{ca_dir.name}-{role}" for role in roles}
    procs = {
        role: subprocess.Popen(
            PRIVMED + ["certs", "issue", str(ca_dir), "--name", role, "--out", str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for role, out in outs.items()
    }
    for role, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=CLI_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"privmed certs issue --name {role} hung")
        assert proc.returncode == 0 and not stderr, (
            f"certs issue {role}: exit {proc.returncode}\n{stdout}\n{stderr}"
        )
    return CertSet(
        ca_dir / "ca.pem", {r: (o / f"{r}.pem", o / f"{r}.key") for r, o in outs.items()}
    )


@pytest.fixture(scope="session")
def session_ca(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    """The session CA and one certificate per role."""
    return make_certs(tmp_path_factory.mktemp("pki") / "ca")


@pytest.fixture(scope="session")
def rogue_ca(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    """Another CA (not the session's) with certificates that carry valid role names."""
    return make_certs(tmp_path_factory.mktemp("rogue-pki") / "ca", ("data-owner", "model-owner"))


def write_session(
    path: Path,
    pki: CertSet,
    ports: dict[str, int],
    *,
    timeout_s: float = 10.0,
    connect_timeout_s: float = 10.0,
    override: dict[str, CertSet] | None = None,
) -> Path:
    """Write a session.toml: model owner and dealer listen on 127.0.0.1 at ``ports``.

    ``override`` gives some roles their certificate from another CA (the CA file stays ``pki``'s).
    """
    override = override or {}
    lines = [
        "[session]",
        f'ca = "{pki.ca}"',
        f"timeout_s = {timeout_s}",
        f"connect_timeout_s = {connect_timeout_s}",
        "",
    ]
    for role in ROLES:
        cert, key = override.get(role, pki).certs[role]
        lines += [f"[{role}]", f'cert = "{cert}"', f'key = "{key}"']
        if role != "data-owner":
            lines += ['host = "127.0.0.1"', f"port = {ports[role]}"]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


# -- ports ---------------------------------------------------------------------------------------


def free_port() -> int:
    """A port the OS considers free right now (small race until the party binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def hold_port(listen: bool) -> Iterator[int]:
    """A port bound by this test: listening (port in use) or not (connections refused)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.bind(("127.0.0.1", 0))
        if listen:
            s.listen(1)
        yield int(s.getsockname()[1])
    finally:
        s.close()


def time_wait_port() -> int:
    """A free port whose last server-side connection is in TIME_WAIT (as after a finished session).

    The server end closes first, so the TIME_WAIT entry is on the listening port; Linux keeps it
    for 60 s. A new listener can bind such a port only if both it and the old listener set
    SO_REUSEADDR, so this one does (as a privmed listener must, for back-to-back sessions).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = int(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        server_end, _ = listener.accept()
        server_end.close()
        time.sleep(0.05)
        client.close()
        time.sleep(0.05)
    return port


# -- parties as processes -------------------------------------------------------------------------


@dataclass
class PartyRun:
    """Roles started with ``privmed party``; stderr of each kept in a file; killed on exit."""

    workdir: Path
    config: Path
    cwd: Path | None = None
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    started_at: dict[str, float] = field(default_factory=dict)
    ended_at: dict[str, float] = field(default_factory=dict)
    _buf: bytes = b""
    progress: list[str] = field(default_factory=list)

    def start(self, role: str, *args: str | Path, progress: bool = True) -> None:
        """Start ``privmed party --role ROLE --config CONFIG ARGS`` (data owner: + progress lines)."""
        argv = (
            PRIVMED
            + ["party", "--role", role, "--config", str(self.config)]
            + [str(a) for a in args]
        )
        if (
            role == "data-owner" and progress
        ):  # per-layer JSON lines on stdout, as `privmed infer` uses
            argv.append("--progress-jsonl")
        self.procs[role] = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE if role == "data-owner" else subprocess.DEVNULL,
            stderr=open(self.workdir / f"{role}.err", "wb"),  # noqa: SIM115 - closed by the child's exit
            env=ENV,
            cwd=self.cwd,
            start_new_session=True,
        )
        self.started_at[role] = time.monotonic()

    def stdout(self, role: str) -> str:
        """What an exited data owner printed on stdout (beyond progress lines already read)."""
        proc = self.procs[role]
        assert proc.stdout is not None and proc.poll() is not None
        return (self._buf + proc.stdout.read()).decode(errors="replace")

    def stderr(self, role: str) -> str:
        return (self.workdir / f"{role}.err").read_text(errors="replace")

    def report(self) -> str:
        """Every party's exit code and stderr, for assertion messages."""
        out = []
        for role, p in self.procs.items():
            code = p.poll()
            out.append(
                f"--- {role}: exit {code if code is not None else 'still running'}\n{self.stderr(role)}"
            )
        if self.progress:
            out.append(f"--- data-owner progress: {self.progress[-1]}")
        return "\n".join(out)

    def wait_progress(self, done: int, timeout_s: float) -> None:
        """Block until the data owner reports ``done`` finished layers (fails on timeout or exit)."""
        proc = self.procs["data-owner"]
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while time.monotonic() < deadline:
                if not sel.select(timeout=0.2):
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    pytest.fail(f"data owner closed stdout before layer {done}\n{self.report()}")
                self._buf += chunk
                *lines, self._buf = self._buf.split(b"\n")
                for line in lines:
                    self.progress.append(line.decode(errors="replace"))
                    if _layers_done(line) >= done:
                        return
        pytest.fail(f"data owner did not reach layer {done} within {timeout_s}s\n{self.report()}")

    def signal(self, role: str, sig: signal.Signals) -> float:
        """Send ``sig`` to a role's process group; returns the monotonic time it was sent."""
        os.killpg(self.procs[role].pid, sig)
        return time.monotonic()

    def wait_exits(self, roles: tuple[str, ...], timeout_s: float) -> dict[str, float | None]:
        """Poll until ``roles`` exited or ``timeout_s`` passed; monotonic exit times (None = still up)."""
        wait_exits_all([(self, roles)], timeout_s)
        return {r: self.ended_at.get(r) for r in roles}

    def _poll(self, roles: tuple[str, ...]) -> bool:
        """Record exit times of ``roles`` that just exited; True once all have."""
        for role in roles:
            if role not in self.ended_at and self.procs[role].poll() is not None:
                self.ended_at[role] = time.monotonic()
        return all(r in self.ended_at for r in roles)

    def code(self, role: str) -> int | None:
        return self.procs[role].poll()

    def message(self, role: str) -> str:
        """The role's one-line error message (fails on a traceback or several lines)."""
        return error_message(self.stderr(role), self.report())

    def lifetime(self, role: str) -> float:
        """Seconds from start to exit of a role that has exited (``wait_exits`` first)."""
        return self.ended_at[role] - self.started_at[role]

    def kill_all(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)
            if p.stdout:
                p.stdout.close()


def wait_exits_all(runs: list[tuple[PartyRun, tuple[str, ...]]], timeout_s: float) -> None:
    """Watch several runs at once (exit times stay exact) until all listed roles exited or timeout."""
    deadline = time.monotonic() + timeout_s
    while not all([run._poll(roles) for run, roles in runs]) and time.monotonic() < deadline:
        time.sleep(0.05)


def _layers_done(line: bytes) -> int:
    """``done`` of a progress line ``{"done": 3, "total": 20, ...}`` (0 for anything else)."""
    try:
        return int(json.loads(line).get("done", 0))
    except (ValueError, AttributeError, TypeError):
        return 0


@pytest.fixture
def party_run(tmp_path: Path) -> Iterator[PartyRun]:
    """A ``PartyRun`` in tmp_path; set ``.config`` before ``start``. Survivors are killed after."""
    run = PartyRun(tmp_path, tmp_path / "session.toml")
    try:
        yield run
    finally:
        run.kill_all()
