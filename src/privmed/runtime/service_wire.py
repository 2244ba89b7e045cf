"""The service handshake: which model, which session, admitted or refused.

Each message is one frame (``net.frame``) whose payload is a UTF-8 JSON object of at most
``MAX_HANDSHAKE_BYTES``; it is parsed only after the header check and then held to an exact
schema (no missing or extra key, every value of its type, names and text capped), so a peer's
text never reaches a format string, a path or a dict of our own unchecked. The frames carry
the all-zero session id; the session's own id is set on both channels once it is agreed.

====================  =====================================  =====================================
tag                   sender -> receiver                     fields
====================  =====================================  =====================================
``svc/request``       data owner -> model owner service      ``model`` (name), ``plan`` (pinned
                                                              fingerprint or "")
``svc/open``          model owner -> dealer service          ``session`` (32 hex), ``data_owner``
                                                              (its certificate fingerprint),
                                                              ``model``, ``plan``
``svc/join``          data owner -> dealer service           ``session``
``svc/reply``         service -> the peer that asked         ``ok``, ``code``, ``session``,
                                                              ``plan``, ``error``
====================  =====================================  =====================================

The session id is 16 bytes from ``os.urandom`` chosen by the model owner service, sent only
inside TLS to the data owner and the dealer; the dealer also binds it to the data owner's
certificate fingerprint, so a hospital that learnt another's id still cannot join that session.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from privmed.errors import ProtocolError
from privmed.net.channel import Channel

MAX_HANDSHAKE_BYTES = 1024
MAX_ERROR_CHARS = 300
REQUEST, OPEN, JOIN, REPLY = "svc/request", "svc/open", "svc/join", "svc/reply"
# refusal codes a client may see (``code`` of a reply with ok false)
CODES = ("ok", "busy", "unknown-model", "plan-mismatch", "not-allowed", "wrong-role", "shutting-down",
         "unknown-session", "dealer-unavailable")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_SESSION = re.compile(r"^[0-9a-f]{32}$")
_PLAN = re.compile(r"^([0-9a-f]{64})?$")
_FINGERPRINT = re.compile(r"^sha256:[0-9a-f]{64}$")


def _matches(pattern: re.Pattern[str]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and bool(pattern.match(v))


def _text(v: Any) -> bool:
    return isinstance(v, str) and len(v) <= MAX_ERROR_CHARS and v.isprintable()


SCHEMAS: dict[str, dict[str, Callable[[Any], bool]]] = {
    REQUEST: {"model": _matches(_NAME), "plan": _matches(_PLAN)},
    OPEN: {"session": _matches(_SESSION), "data_owner": _matches(_FINGERPRINT), "model": _matches(_NAME), "plan": _matches(_PLAN)},
    JOIN: {"session": _matches(_SESSION)},
    REPLY: {"ok": lambda v: isinstance(v, bool), "code": lambda v: v in CODES, "session": lambda v: v == "" or _matches(_SESSION)(v),
            "plan": _matches(_PLAN), "error": _text},
}


def send(ch: Channel, tag: str, **fields: Any) -> None:
    """Send one handshake message (checked against its own schema: we never send what we
    would refuse)."""
    check(tag, fields, "ourselves")
    ch.send_text(tag, json.dumps(fields, sort_keys=True))


def check(tag: str, msg: Any, peer: str) -> dict[str, Any]:
    schema = SCHEMAS[tag]
    if not isinstance(msg, dict):
        raise ProtocolError(f"{peer} sent a {tag} that is not a JSON object")
    if set(msg) != set(schema):
        raise ProtocolError(f"{peer} sent a {tag} with fields {sorted(msg)[:8]}, expected {sorted(schema)}")
    bad = [k for k, ok in schema.items() if not ok(msg[k])]
    if bad:
        raise ProtocolError(f"{peer} sent a {tag} with an invalid {bad[0]!r}")
    return msg


def receive(ch: Channel, tag: str, timeout_s: float) -> dict[str, Any]:
    """Receive and check one handshake message of ``tag`` (an abort raises PeerError)."""
    text = ch.recv_text(tag, MAX_HANDSHAKE_BYTES, timeout_s)
    try:
        msg = json.loads(text)
    except ValueError:
        raise ProtocolError(f"{ch.peer} sent a {tag} that is not JSON") from None
    return check(tag, msg, ch.peer)


def reply(ch: Channel, code: str = "ok", error: str = "", session: str = "", plan: str = "") -> None:
    error = "".join(c if c.isprintable() else " " for c in error[:MAX_ERROR_CHARS])
    send(ch, REPLY, ok=code == "ok", code=code, session=session, plan=plan, error=error)
