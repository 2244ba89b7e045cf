"""Flower's deployment engine on loopback: one SuperLink and three SuperNodes as separate
processes (``privmed federate server|site``), TLS with a CA made for the run, one round
submitted by ``privmed federate run``. Every process has a deadline and its output is shown
when the test fails.

SuperNode authentication is on (the default): each site makes its own key pair with
``privmed federate site-key``, the operator registers the three public keys with
``privmed federate register``, and a fourth SuperNode with an unregistered key, claiming a
real site's name, must be refused while the round runs with the three registered sites.

The round runs without SecAgg+ (sites started with ``--allow-plain``): Flower 1.41's
deployment engine starts a process per message and polls every 3 s, so each SecAgg+ round
(5 messages per site instead of 2) adds about a minute, beyond this tier's time budget.
SecAgg+ itself is tested through Flower's workflow and mod in tests/protocol, and a SecAgg+
round over this same deployment is measured in docs/federated.md. The aggregate is checked
against plaintext FedAvg of the updates recomputed here, so the deployment did the real
computation.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

PRIVMED = [sys.executable, "-m", "privmed.cli.main"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
SITES = ("site_a", "site_b", "site_c")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_superlink_and_three_supernodes_over_tls(tmp_path):
    import torch

    from privmed.data.synth import synth_chest_study
    from privmed.federated.checkpoint import RunDir

    study = synth_chest_study(tmp_path / "study", sites=3, n_per_site=24, size=32, seed=4)
    certs = tmp_path / "certs"
    subprocess.run([*PRIVMED, "federate", "certs", "--out", str(certs)], check=True, env=ENV, timeout=60,
                   capture_output=True)  # fmt: skip
    port = _free_port()
    procs: dict[str, subprocess.Popen] = {}
    logs: dict[str, Path] = {}

    def start(name: str, argv: list[str]) -> None:
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "wb") as fh:
            procs[name] = subprocess.Popen([*PRIVMED, *argv], stdout=fh, stderr=subprocess.STDOUT, env=ENV,
                                           start_new_session=True)  # fmt: skip

    # every hospital makes its own key pair; the operator registers the three public keys
    for site in (*SITES, "rogue"):
        subprocess.run([*PRIVMED, "federate", "site-key", "--site", site, "--out", str(tmp_path / "keys" / site)],
                       check=True, env=ENV, timeout=60, capture_output=True)  # fmt: skip
    try:
        start("server", ["federate", "server", "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port),
                         "--state", str(tmp_path / "server-state")])  # fmt: skip
        reg = subprocess.run(
            [*PRIVMED, "federate", "register", "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
             *(str(tmp_path / "keys" / site / f"{site}.pub") for site in SITES)],
            capture_output=True, text=True, env=ENV, timeout=180,
        )  # fmt: skip
        assert reg.returncode == 0, reg.stdout + reg.stderr
        assert [ln.split()[1] for ln in reg.stdout.splitlines()] == list(SITES)
        for site in SITES:
            start(site, ["federate", "site", "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
                         "--data", str(study), "--site", site, "--state", str(tmp_path / "state" / site),
                         "--auth-key", str(tmp_path / "keys" / site / f"{site}.key"),
                         "--port", str(_free_port()), "--wait", "120", "--allow-plain"])  # fmt: skip
        # an unregistered key claiming a real site's name must not get in
        start("rogue", ["federate", "site", "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
                        "--data", str(study), "--site", SITES[0], "--state", str(tmp_path / "state" / "rogue"),
                        "--auth-key", str(tmp_path / "keys" / "rogue" / "rogue.key"),
                        "--port", str(_free_port()), "--wait", "120", "--allow-plain"])  # fmt: skip
        out = tmp_path / "run"
        run = subprocess.run(
            [*PRIVMED, "federate", "run", "--superlink", f"127.0.0.1:{port}", "--ca", str(certs / "ca.crt"),
             "--sites", ",".join(SITES), "--labels", "opacity,nodule,effusion,cardiomegaly",
             "--model", "small-cnn", "--features", "8,16,16", "--image-size", "32", "--batch-size", "8",
             "--rounds", "1", "--no-secagg", "--wait", "120", "--out", str(out)],
            capture_output=True, text=True, env=ENV, timeout=600,
        )  # fmt: skip
        for name, proc in procs.items():
            if name != "rogue":
                assert proc.poll() is None, f"{name} exited early:\n{logs[name].read_text()[-2000:]}"
        rogue_log = logs["rogue"].read_text(errors="replace")
        assert "Connection attempt failed" in rogue_log and "SuperNode ID" not in rogue_log, rogue_log[-2000:]
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    except BaseException:
        for name, path in logs.items():
            print(f"==== {name}\n{path.read_text(errors='replace')[-3000:]}")
        raise
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    report = json.loads((out / "report.json").read_text())
    assert report["status"]["state"] == "complete"
    assert [r["round"] for r in report["rounds"]] == [1]
    assert sorted(report["rounds"][0]["sites"]) == list(SITES)
    assert (out / "model.onnx").is_file()
    assert "pooled AUROC" in run.stdout

    # oracle: plaintext FedAvg of the three updates recomputed here, within the SecAgg+ bound
    from privmed.federated.arrays import weighted_average
    from privmed.federated.client_app import round_data_seed
    from privmed.federated.local import LocalTraining, client_update
    from privmed.federated.sitedata import load_site

    torch.set_num_threads(1)
    rd = RunDir(out)
    cfg = rd.stored_config()
    _, w0, _ = rd.load_round(0)
    _, w1, _ = rd.load_round(1)
    updates, weights = [], []
    for site in SITES:
        data = load_site(study, site, labels=cfg.labels, image_size=32, test_fraction=cfg.test_fraction)
        u = client_update(cfg.build_model(), w0, data.x_train, data.y_train,
                          LocalTraining(1, 8, cfg.lr), data_seed=round_data_seed(cfg.seed, 1, site))  # fmt: skip
        updates.append(u.delta)
        weights.append(u.num_examples)
    plain = weighted_average(updates, weights)
    worst = max(float(np.abs((b.astype(np.float64) - a) - p).max()) for a, b, p in zip(w0, w1, plain, strict=True))
    assert worst <= 1e-6  # float32 rounding of w0 + aggregate only
    assert max(float(np.abs(p).max()) for p in plain) > 1e-3
