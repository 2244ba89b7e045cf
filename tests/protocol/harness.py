"""Run the three roles as threads over in-process channels; collect every party's error."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np

from privmed.ir.plan import Plan, PrivateWeights
from privmed.net.channel import in_process_pair
from privmed.runtime import session


def run_three(plan: Plan, weights: PrivateWeights, x: np.ndarray, timeout_s: float = 60.0) -> tuple[np.ndarray, dict[str, Any]]:
    sid = os.urandom(16)
    d_m, m_d = in_process_pair("data-owner", "model-owner", sid, timeout_s)
    d_x, x_d = in_process_pair("data-owner", "dealer", sid, timeout_s)
    m_x, x_m = in_process_pair("model-owner", "dealer", sid, timeout_s)
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def role(name: str, fn, *args) -> None:  # type: ignore[no-untyped-def]
        try:
            results[name] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors[name] = exc
            for ch in (d_m, m_d, d_x, x_d, m_x, x_m):
                ch.close()

    threads = [
        threading.Thread(target=role, args=("data-owner", session.data_owner, d_m, d_x, x)),
        threading.Thread(target=role, args=("model-owner", session.model_owner, m_d, m_x, plan, weights)),
        threading.Thread(target=role, args=("dealer", session.dealer, x_d, x_m)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * 4)
    if any(t.is_alive() for t in threads):
        raise TimeoutError("a party thread did not finish")
    if errors:
        raise RuntimeError("; ".join(f"{k}: {type(v).__name__}: {v}" for k, v in errors.items())) from next(iter(errors.values()))
    out, stats = results["data-owner"]
    return out, {"data-owner": stats, "model-owner": results["model-owner"], "dealer": results["dealer"]}
