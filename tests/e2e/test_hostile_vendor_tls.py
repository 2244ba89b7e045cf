"""A hostile model owner over real TLS: real `privmed party` data owner and dealer processes
refuse its crafted plan (the broadcast-mask attack) with one line, before anything is opened."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import (
    ENV,
    CertSet,
    PartyRun,
    TinyModel,
    error_message,
    free_port,
    wait_exits_all,
    write_session,
)

pytestmark = pytest.mark.timeout(120)

HOSTILE_MODEL_OWNER = """
import json, sys
from pathlib import Path
import numpy as np
from privmed.compiler.compile import compile_model
from privmed.runtime.config import load_config
from privmed.runtime.party import connect_role

cfg = load_config(Path(sys.argv[1]))
plan, _ = compile_model(Path(sys.argv[2]))
raw = json.loads(plan.to_json())
first = raw["nodes"][0]
# one extra truncation declared as a single element: a broadcast mask would reveal x - r
raw["nodes"].insert(1, {"id": "spy", "op": "trunc", "inputs": [first["id"]], "shape": [1], "scale": 0, "attrs": {"shift": 0}})
chans = connect_role("model-owner", cfg)
for ch in chans.values():
    ch.send_text("plan", json.dumps(raw))
try:
    chans["data-owner"].recv("batch", np.int64, (1,))
    print("GOT A BATCH")
except Exception as exc:
    print(f"first message from the data owner: {exc}")
"""


def test_real_processes_refuse_a_crafted_plan_before_any_opening(tmp_path: Path, session_ca: CertSet, tiny_cnn: TinyModel) -> None:
    # Prepare: a session file; the data owner and the dealer are the real CLI
    ports = {"model-owner": free_port(), "dealer": free_port()}
    config = write_session(tmp_path / "session.toml", session_ca, ports)
    run = PartyRun(tmp_path, config)
    run.start("dealer")
    vendor = subprocess.Popen([sys.executable, "-c", HOSTILE_MODEL_OWNER, str(config), str(tiny_cnn.onnx)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        run.start("data-owner", "--input", tiny_cnn.input, "--output", tmp_path / "out.npy", progress=False)
        # Execute
        wait_exits_all([(run, ("data-owner", "dealer"))], 60)
        out, err = vendor.communicate(timeout=30)
    finally:
        vendor.kill()
        run.kill_all()
    # Assert: one line each, naming the node and the rule; the vendor got an abort, no batch
    for role in ("data-owner", "dealer"):
        assert run.code(role) == 2, run.report()
        message = error_message(run.stderr(role), run.report())
        assert "refused the model owner's plan: node spy (trunc): declared shape [1]" in message, message
    assert "GOT A BATCH" not in out and "aborted the session: refused the model owner's plan" in out, out + err
    assert not (tmp_path / "out.npy").exists()
