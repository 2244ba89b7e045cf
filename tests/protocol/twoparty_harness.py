"""Run the data owner and the model owner as two threads over in-process channels, with no
dealer; collect both parties' errors (a failing party closes its channel so the other one
stops waiting) and check both finished."""

from __future__ import annotations

import os
import threading
import traceback
from collections.abc import Callable
from typing import Any

from privmed.net.channel import Channel, in_process_pair

PartyFn = Callable[[Channel], Any]


def run_two(data_owner: PartyFn, model_owner: PartyFn, timeout_s: float = 30.0) -> tuple[Any, Any, tuple[Channel, Channel]]:
    """(data owner's result, model owner's result, (data owner's channel, model owner's channel))."""
    ch0, ch1 = in_process_pair("data-owner", "model-owner", os.urandom(16), timeout_s)
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}

    def role(i: int, fn: PartyFn, ch: Channel) -> None:
        try:
            results[i] = fn(ch)
        except BaseException:  # noqa: BLE001 - reported below with the traceback
            errors[i] = traceback.format_exc()
            ch.close()

    threads = [threading.Thread(target=role, args=(i, fn, ch)) for i, (fn, ch) in enumerate(((data_owner, ch0), (model_owner, ch1)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s * 4)
    if any(t.is_alive() for t in threads):
        raise TimeoutError("a party thread did not finish")
    if errors:
        names = {0: "data-owner", 1: "model-owner"}
        raise RuntimeError("\n".join(f"{names[i]}:\n{tb}" for i, tb in sorted(errors.items())))
    return results[0], results[1], (ch0, ch1)
