"""A data owner that lies about its batch size: the model owner and the dealer refuse it
against what the plan implies, before allocating anything for the batch."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from privmed.compiler.compile import compile_model
from privmed.errors import ProtocolError
from privmed.net.channel import in_process_pair
from privmed.runtime import session

DEMO = Path(__file__).resolve().parents[2] / "src/privmed/assets/models/chest_smallcnn.onnx"


@pytest.mark.parametrize("batch", [-1, 1 << 40], ids=["negative", "huge"])
def test_a_lying_batch_size_is_refused_by_the_model_owner_and_the_dealer(batch: int) -> None:
    plan, weights = compile_model(DEMO)
    sid = os.urandom(16)
    d_m, m_d = in_process_pair("data-owner", "model-owner", sid, 5)
    d_x, x_d = in_process_pair("data-owner", "dealer", sid, 5)
    m_x, x_m = in_process_pair("model-owner", "dealer", sid, 5)
    errors: dict[str, BaseException] = {}

    def role(name: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            fn(*args)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            errors[name] = exc

    threads = [threading.Thread(target=role, args=("model-owner", session.model_owner, m_d, m_x, plan, weights)),
               threading.Thread(target=role, args=("dealer", session.dealer, x_d, x_m))]  # fmt: skip
    for t in threads:
        t.start()
    # the hostile data owner: takes the plan, then announces an impossible batch
    d_m.recv("plan", np.uint8, None, max_bytes=1 << 24)
    for ch in (d_m, d_x):
        ch.send("batch", np.array([batch], np.int64))
    for t in threads:
        t.join(10)
    assert set(errors) == {"model-owner", "dealer"}
    for exc in errors.values():
        assert isinstance(exc, ProtocolError) and f"announced batch size {batch}" in str(exc)
    # nothing but the plan went out: no seed, no correction, no masked weight
    assert m_d.counters.messages_sent == 1 and x_d.counters.messages_sent == 0 and x_m.counters.messages_sent == 0
