"""The data owner's side of a session with a model owner service and a dealer service.

The hospital only connects out (to the addresses of its session file's ``[model-owner]`` and
``[dealer]``): it asks the model owner service for a model by name (``svc/request``, with the
pinned plan fingerprint if any), receives the session id, joins that session at the dealer
(``svc/join``) and then runs the ordinary data owner protocol (``session.data_owner``),
which checks the plan and its pinned fingerprint again on receipt. A refusal (busy,
unknown model, not on the allow-list, shutting down) is raised as one line naming the service
and its reason; nothing derived from the input has been sent by then.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from privmed.crypto.csr import check_own_role
from privmed.errors import PeerError
from privmed.net.channel import Channel, FailureGroup
from privmed.net.tls import TlsChannel, connect
from privmed.runtime import service_wire as wire
from privmed.runtime import session
from privmed.runtime.config import SessionConfig

ZERO_SESSION = bytes(16)


class ServiceRefused(PeerError):
    """A service refused the session before it started (``code`` says why: busy, ...)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _ask(ch: Channel, where: str, tag: str, timeout_s: float, **fields: Any) -> dict[str, Any]:
    try:
        wire.send(ch, tag, **fields)
        rep = wire.receive(ch, wire.REPLY, timeout_s)
    except PeerError as exc:  # a service refuses a certificate (role, allow-list) with an abort,
        # which may arrive before our request is sent
        prefix = f"{ch.peer} aborted the session: "
        if str(exc).startswith(prefix):
            raise ServiceRefused(f"{ch.peer} at {where} refused the connection: {str(exc)[len(prefix):]}", "refused") from None
        raise
    if not rep["ok"]:
        raise ServiceRefused(f"{ch.peer} at {where} refused the session ({rep['code']}): {rep['error']}", rep["code"])
    return rep


def open_session(cfg: SessionConfig, model_name: str, expect_plan: str | None, group: FailureGroup) -> tuple[str, Channel, Channel]:
    """Request ``model_name`` and join its session at the dealer: (session id hex, to_model,
    to_dealer), both channels already carrying the session id."""
    ident = cfg.identities["data-owner"]
    check_own_role(ident.cert, "data-owner")
    chans: list[Channel] = []
    try:
        mep = cfg.endpoints["model-owner"]
        sock = connect(ident, "model-owner", mep.host, mep.port, cfg.connect_timeout_s)
        to_model = TlsChannel("data-owner", "model-owner", ZERO_SESSION, sock, cfg.timeout_s, group)
        chans.append(to_model)
        rep = _ask(to_model, f"{mep.host}:{mep.port}", wire.REQUEST, cfg.connect_timeout_s,
                   model=model_name, plan=(expect_plan or "").strip().lower())
        sid = rep["session"]
        dep = cfg.endpoints["dealer"]
        dsock = connect(ident, "dealer", dep.host, dep.port, cfg.connect_timeout_s)
        to_dealer = TlsChannel("data-owner", "dealer", ZERO_SESSION, dsock, cfg.timeout_s, group)
        chans.append(to_dealer)
        _ask(to_dealer, f"{dep.host}:{dep.port}", wire.JOIN, cfg.connect_timeout_s, session=sid)
    except BaseException:
        for ch in chans:
            ch.close(flush_s=1.0)
        raise
    to_model.session = to_dealer.session = bytes.fromhex(sid)
    return sid, to_model, to_dealer


BUSY_CODES = ("busy", "shutting-down")
MAX_BUSY_DELAY_S = 10.0


def open_session_waiting(cfg: SessionConfig, model_name: str, expect_plan: str | None, busy_wait_s: float,
                         on_busy: Callable[[str], None] | None = None) -> tuple[str, Channel, Channel, FailureGroup]:
    """``open_session``, retried while the services answer busy or shutting-down, for at most
    ``busy_wait_s`` (delays doubling from 1 s up to 10 s); then the refusal is raised."""
    deadline = time.monotonic() + busy_wait_s
    delay = 1.0
    while True:
        group = FailureGroup()
        try:
            return (*open_session(cfg, model_name, expect_plan, group), group)
        except ServiceRefused as exc:
            left = deadline - time.monotonic()
            if exc.code not in BUSY_CODES or left <= 0:
                raise
            if on_busy:
                on_busy(str(exc))
            time.sleep(min(delay, left))
            delay = min(2 * delay, MAX_BUSY_DELAY_S)


def run_service_session(
    cfg: SessionConfig,
    model_name: str,
    x: np.ndarray,
    *,
    chunk: int | None = None,
    expect_plan: str | None = None,
    progress: Callable[..., None] | None = None,
    on_plan: Callable[[Any], None] | None = None,
    busy_wait_s: float = 0.0,
    on_busy: Callable[[str], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """One session with the services named in ``cfg``: (outputs, the data owner's stats)."""
    sid, to_model, to_dealer, _group = open_session_waiting(cfg, model_name, expect_plan, busy_wait_s, on_busy)
    failed = False
    try:
        step = chunk or len(x)
        parts = [x[i : i + step] for i in range(0, len(x), step)]
        out, stats = session.data_owner(to_model, to_dealer, iter(parts), progress, len(parts),
                                        expect_plan=expect_plan, on_plan=on_plan)
        stats["session"] = sid
        stats["model_name"] = model_name
        return out, stats
    except BaseException as exc:
        failed = True
        for ch in (to_model, to_dealer):
            ch.abort(f"data-owner failed: {exc}")
        raise
    finally:
        for ch in (to_model, to_dealer):
            ch.close(flush_s=2.0 if failed else None)
