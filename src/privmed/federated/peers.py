"""What the server accepts from sites: checks of peer messages, error texts, deadlines.

- ``parse_evaluation``: a site's evaluation result (site name, AUROCs, score histogram),
  checked for types, sizes and ranges before use;
- ``failure_text``: one line from a Flower failure, keeping the exception's class name;
- ``DeadlineGrid``: a Flower ``Grid`` whose every ``send_and_receive`` has a deadline and
  which remembers site errors and missing replies, so a failed round can say why.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Message
from flwr.common import EvaluateRes
from flwr.server import Grid

from privmed.errors import ProtocolError
from privmed.federated.metrics import BINS

__all__ = ["DeadlineGrid", "failure_text", "json_default", "parse_evaluation"]


def failure_text(failure: Any) -> str:
    """One line from a Flower failure (an Exception, an Error or a (proxy, result) pair)."""
    if isinstance(failure, BaseException):
        text = str(failure)
    elif isinstance(failure, tuple):
        text = str(getattr(failure[1], "status", failure))
    else:
        text = str(getattr(failure, "reason", failure))
    # Flower wraps ClientApp errors as "<class 'pkg.mod.Name'>:<'message'>"
    match = re.search(r"<class '([\w.]+)'>:<'(.*)'>", text, flags=re.S)
    if match:
        text = f"{match.group(1).rsplit('.', 1)[-1]}: {match.group(2)}"
    return " ".join(text.split())[:300]


def json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return None
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def parse_evaluation(res: EvaluateRes, k: int) -> tuple[str, list[float | None], np.ndarray]:
    """Check one site's evaluation metrics (types and sizes) before use."""
    site, auroc_text, hist_bytes = res.metrics.get("site"), res.metrics.get("auroc"), res.metrics.get("hist")
    if not isinstance(site, str) or not isinstance(auroc_text, str) or not isinstance(hist_bytes, bytes):
        raise ProtocolError("evaluation result: expected str site, str auroc and bytes hist")
    aurocs = json.loads(auroc_text)
    if not isinstance(aurocs, list) or len(aurocs) != k or not all(
        a is None or (isinstance(a, float) and 0.0 <= a <= 1.0) for a in aurocs
    ):
        raise ProtocolError(f"evaluation result from {site}: expected {k} AUROCs in [0, 1] or null")
    if len(hist_bytes) != k * 2 * BINS * 8:
        raise ProtocolError(
            f"evaluation result from {site}: expected {k * 2 * BINS * 8} histogram bytes, got {len(hist_bytes)}"
        )
    hist = np.frombuffer(hist_bytes, dtype="<i8").reshape(k, 2, BINS)
    if np.any(hist < 0):
        raise ProtocolError(f"evaluation result from {site}: negative histogram counts")
    return site, aurocs, hist


class DeadlineGrid:
    """A Grid whose ``send_and_receive`` always has a deadline (Flower's default workflows
    pass none and would wait forever for a vanished site) and which remembers site errors
    and missing replies, so that a failed round can say why."""

    def __init__(self, grid: Grid, timeout: float) -> None:
        self._grid, self._timeout = grid, timeout
        self.problems: list[str] = []

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        sent = list(messages)
        deadline = self._timeout if timeout is None else timeout
        replies = list(self._grid.send_and_receive(sent, timeout=deadline))
        for reply in replies:
            if reply.has_error():
                self.problems.append(failure_text(reply.error))
        if len(replies) < len(sent):
            self.problems.append(f"{len(sent) - len(replies)} of {len(sent)} sites did not answer within {deadline:g} s")
        return replies

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
