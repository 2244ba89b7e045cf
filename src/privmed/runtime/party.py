"""One role as a process: connect over mutual TLS as the session file says, run the session."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from privmed.crypto.csr import check_own_role
from privmed.errors import ConfigError, PeerError, ProtocolError
from privmed.net.channel import Channel, FailureGroup
from privmed.net.tls import TlsChannel, connect
from privmed.net.tls_listen import Listener
from privmed.runtime import session
from privmed.runtime.config import Endpoint, SessionConfig
from privmed.runtime.memory import keep_freed_memory

log = logging.getLogger(__name__)
ZERO_SESSION = bytes(16)


def _resolve_port(ep: Endpoint, deadline: float, peer: str) -> int:
    if ep.port or ep.port_file is None:
        return ep.port
    while time.monotonic() < deadline:
        try:
            text = ep.port_file.read_text().strip()
            if text:
                return int(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    raise PeerError(f"{peer} did not publish its port in {ep.port_file}")


def _listen(cfg: SessionConfig, role: str) -> Listener:
    ep = cfg.endpoints[role]
    lst = Listener(cfg.identities[role], ep.host, ep.port)
    if ep.port_file:
        tmp = ep.port_file.with_suffix(".tmp")
        tmp.write_text(str(lst.port))
        os.replace(tmp, ep.port_file)
    return lst


def _channel(me: str, peer: str, sock: Any, cfg: SessionConfig, group: FailureGroup) -> Channel:
    return TlsChannel(me, peer, ZERO_SESSION, sock, cfg.timeout_s, group)


def _hello(ch: Channel, sid: bytes) -> None:
    ch.send("hello", np.frombuffer(sid, np.uint8))
    ch.session = sid


def _await_hello(ch: Channel, timeout_s: float) -> bytes:
    sid = bytes(ch.recv("hello", np.uint8, (16,), timeout_s))
    ch.session = sid
    return sid


def connect_role(role: str, cfg: SessionConfig, on_listening: Callable[[], None] | None = None) -> dict[str, Channel]:
    """Establish this role's two channels, keyed by peer role.

    ``on_listening`` runs once the listening socket is bound (the model owner compiles its
    model there: a taken port is reported before compiling, and peers connect meanwhile).
    """
    deadline = time.monotonic() + cfg.connect_timeout_s
    ident = cfg.identities[role]
    check_own_role(ident.cert, role)  # at start, not after the peers' timeouts
    chans: dict[str, Channel] = {}
    group = FailureGroup()
    if role == "data-owner":
        sid = os.urandom(16)
        for peer in ("model-owner", "dealer"):
            ep = cfg.endpoints[peer]
            port = _resolve_port(ep, deadline, peer)
            sock = connect(ident, peer, ep.host, port, max(0.1, deadline - time.monotonic()))
            chans[peer] = _channel(role, peer, sock, cfg, group)
            _hello(chans[peer], sid)
        return chans
    lst = _listen(cfg, role)
    try:
        if on_listening:
            on_listening()
        if role == "model-owner":
            _, sock = lst.accept({"data-owner"}, max(0.1, deadline - time.monotonic()))
            chans["data-owner"] = _channel(role, "data-owner", sock, cfg, group)
            sid = _await_hello(chans["data-owner"], cfg.connect_timeout_s)
            ep = cfg.endpoints["dealer"]
            port = _resolve_port(ep, deadline, "dealer")
            dsock = connect(ident, "dealer", ep.host, port, max(0.1, deadline - time.monotonic()))
            chans["dealer"] = _channel(role, "dealer", dsock, cfg, group)
            _hello(chans["dealer"], sid)
            return chans
        if role == "dealer":
            while len(chans) < 2:
                peer, sock = lst.accept({"data-owner", "model-owner"} - set(chans), max(0.1, deadline - time.monotonic()))
                chans[peer] = _channel(role, peer, sock, cfg, group)
            sids = {p: _await_hello(c, cfg.connect_timeout_s) for p, c in chans.items()}
            if sids["data-owner"] != sids["model-owner"]:
                raise ProtocolError("data-owner and model-owner announced different session ids")
            return chans
    finally:
        lst.close()
    raise ConfigError(f"unknown role {role!r}")


def run_role(
    role: str,
    cfg: SessionConfig,
    *,
    plan_and_weights: tuple[Any, Any] | Callable[[], tuple[Any, Any]] | None = None,
    x: np.ndarray | None = None,
    chunk: int | None = None,
    progress: Callable[..., None] | None = None,
    expect_plan: str | None = None,
    on_plan: Callable[[Any], None] | None = None,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Connect, run the session as ``role`` and close. Returns (output or None, stats).

    Data owner: ``expect_plan`` refuses any plan whose SHA-256 fingerprint differs;
    ``on_plan`` sees the accepted plan before any input-derived message is sent."""
    keep_freed_memory()  # also a role started by hand on its own host (``privmed.runtime.memory``)
    compiled: list[tuple[Any, Any]] = []

    def prepare() -> None:
        if callable(plan_and_weights):
            compiled.append(plan_and_weights())
        elif plan_and_weights is not None:
            compiled.append(plan_and_weights)

    chans = connect_role(role, cfg, prepare if role == "model-owner" else None)
    failed = False
    try:
        if role == "data-owner":
            assert x is not None
            step = chunk or len(x)
            parts = [x[i : i + step] for i in range(0, len(x), step)]
            return session.data_owner(chans["model-owner"], chans["dealer"], iter(parts), progress, len(parts),
                                      expect_plan=expect_plan, on_plan=on_plan)
        if role == "model-owner":
            return None, session.model_owner(chans["data-owner"], chans["dealer"], *compiled[0], progress=progress)
        return None, session.dealer(chans["data-owner"], chans["model-owner"])
    except BaseException as exc:
        failed = True
        for ch in chans.values():
            ch.abort(f"{role} failed: {exc}")
        raise
    finally:
        for ch in chans.values():
            # after a failure the abort goes out if the peer still reads; never wait longer
            ch.close(flush_s=2.0 if failed else None)
