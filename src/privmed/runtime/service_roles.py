"""What the model owner and dealer services do with an admitted connection.

Model owner service, per data owner connection (a thread; steps 1-3 within
``connect_timeout_s``, then the session protocol of ``runtime.session`` with ``timeout_s``):

1. receive ``svc/request`` (model name, optional pinned plan fingerprint); refuse an unknown
   model, a plan that is not the pinned one, or when no session slot is free (``busy``);
2. draw a session id (16 bytes, ``os.urandom``), connect to the dealer service and register
   the session with ``svc/open`` (the id and the data owner's certificate fingerprint);
3. reply ``ok`` with the session id and the plan fingerprint; the data owner joins at the
   dealer; then ``session.model_owner`` with the model's plan and weights.

Dealer service: a model owner's connection registers a session and waits (at most
``connect_timeout_s``) until the data owner with *that certificate* joins it with
``svc/join``; the two connections then become one session running ``session.dealer`` with
fresh seeds. A join with an unknown id, an id already joined, or another data owner's
certificate is refused and changes nothing for the session it named.
"""

from __future__ import annotations

import os
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from privmed.errors import PeerError, PrivmedError, ProtocolError
from privmed.ir.plan import Plan, PrivateWeights
from privmed.net.channel import Channel, FailureGroup
from privmed.net.tls import TlsChannel, connect
from privmed.runtime import service_wire as wire
from privmed.runtime import session
from privmed.runtime.service import AuditLog, PeerId, Service, allowed, now_iso
from privmed.runtime.service_config import ServiceConfig

ZERO_SESSION = bytes(16)
JOIN_POLL_S = 0.2  # how often a session waiting for its data owner looks at its model owner
HANDSHAKE_FRAME = 2 * wire.MAX_HANDSHAKE_BYTES  # before admission: a handshake message or an abort


@dataclass(frozen=True)
class ServedModel:
    name: str
    plan: Plan
    weights: PrivateWeights
    fingerprint: str


def _counters(chans: list[Channel]) -> dict[str, int]:
    return {"bytes_sent": sum(c.counters.bytes_sent for c in chans), "bytes_recv": sum(c.counters.bytes_recv for c in chans)}


def _finish(chans: list[Channel], failed: bool) -> None:
    for ch in chans:
        ch.close(flush_s=2.0 if failed else None)


def _run(role: str, chans: list[Channel], record: dict[str, Any], body: Any) -> None:
    """Run one session's protocol; fill ``record`` with its outcome (never raises)."""
    t0 = time.perf_counter()
    failed = True
    try:
        stats = body()
        failed = False
        record.update(outcome="ok", images=sum(int(b.get("n", 0)) for b in stats.get("batches", [])),
                      batches=len(stats.get("batches", [])), rounds=stats.get("rounds", 0))
    except PrivmedError as exc:
        record.update(outcome="failed", error=str(exc))
    except Exception as exc:  # noqa: BLE001 - a bug ends this session, never the service
        record.update(outcome="failed", error=f"internal error: {type(exc).__name__}: {exc}")
    finally:
        if failed:
            for ch in chans:
                ch.abort(f"{role} failed: {record.get('error', '')}")
        record.update(_counters(chans), wall_s=round(time.perf_counter() - t0, 4), end=now_iso())
        _finish(chans, failed)


class ModelOwnerService:
    """Serves ``models`` (name -> compiled model) to admitted data owners."""

    def __init__(self, cfg: ServiceConfig, models: dict[str, ServedModel], audit: AuditLog) -> None:
        self.cfg = cfg
        self.models = models
        self.service = Service(cfg, self.admit, self.handle, audit)

    def admit(self, peer: PeerId) -> tuple[str, str] | None:
        if peer.role != "data-owner":
            return "wrong-role", f"model-owner refused a certificate issued to {peer.role!r}; expected data-owner"
        if not allowed(peer, self.cfg.allow):
            return "not-allowed", f"model-owner does not admit {peer.org or 'this data owner'!r} ({peer.fingerprint}): not on its allow-list"
        return None

    def handle(self, svc: Service, peer: PeerId, tls: ssl.SSLSocket) -> None:
        group = FailureGroup()
        to_data = TlsChannel("model-owner", "data-owner", ZERO_SESSION, tls, self.cfg.timeout_s, group)
        to_data.max_frame = HANDSHAKE_FRAME  # raised once the request is admitted
        record: dict[str, Any] = {"time": now_iso(), "service": "model-owner", "peer": peer.audit()}
        try:
            self._handle(svc, peer, to_data, group, record)
        finally:
            svc.audit.write(record)

    def _refuse(self, to_data: Channel, record: dict[str, Any], code: str, error: str) -> None:
        record.update(outcome="refused", code=code, error=error)
        try:
            wire.reply(to_data, code, error)
        except PrivmedError:
            pass
        to_data.close(flush_s=2.0)

    def _handle(self, svc: Service, peer: PeerId, to_data: TlsChannel, group: FailureGroup, record: dict[str, Any]) -> None:
        ct = self.cfg.connect_timeout_s
        try:
            req = wire.receive(to_data, wire.REQUEST, ct)
        except PrivmedError as exc:
            record.update(outcome="failed", error=str(exc))
            to_data.close(flush_s=1.0)
            return
        model = self.models.get(req["model"])
        record.update(model=req["model"])
        if model is None:
            return self._refuse(to_data, record, "unknown-model",
                                f"no model {req['model']!r} here; this service has {', '.join(sorted(self.models))}")
        record.update(plan=model.fingerprint)
        if req["plan"] and req["plan"] != model.fingerprint:
            return self._refuse(to_data, record, "plan-mismatch",
                                f"model {model.name!r} has plan {model.fingerprint}, not the pinned {req['plan']}")
        refusal = svc.reserve(peer)
        if refusal is not None:
            return self._refuse(to_data, record, *refusal)
        try:
            self._session(peer, model, to_data, group, record)
        finally:
            svc.release(peer)

    def _session(self, peer: PeerId, model: ServedModel, to_data: TlsChannel, group: FailureGroup, record: dict[str, Any]) -> None:
        ct = self.cfg.connect_timeout_s
        sid = os.urandom(16)
        record.update(session=sid.hex())
        assert self.cfg.dealer is not None  # load_service_config requires [dealer] for a model owner
        host, port = self.cfg.dealer
        try:
            sock = connect(self.cfg.identity, "dealer", host, port, ct)
        except PrivmedError as exc:
            return self._refuse(to_data, record, "dealer-unavailable", f"the vendor's dealer is unavailable: {exc}")
        to_dealer = TlsChannel("model-owner", "dealer", ZERO_SESSION, sock, self.cfg.timeout_s, group)
        try:
            wire.send(to_dealer, wire.OPEN, session=sid.hex(), data_owner=peer.fingerprint, model=model.name, plan=model.fingerprint)
            rep = wire.receive(to_dealer, wire.REPLY, ct)
        except PrivmedError as exc:
            to_dealer.close(flush_s=1.0)
            return self._refuse(to_data, record, "dealer-unavailable", f"the dealer failed to open the session: {exc}")
        if not rep["ok"]:
            to_dealer.close(flush_s=1.0)
            code = rep["code"] if rep["code"] in ("busy", "shutting-down") else "dealer-unavailable"
            return self._refuse(to_data, record, code, f"the dealer refused the session: {rep['error']}")
        to_data.max_frame = to_dealer.max_frame = self.cfg.max_frame_bytes  # before the peers may send more

        def body() -> dict[str, Any]:
            wire.reply(to_data, "ok", session=sid.hex(), plan=model.fingerprint)
            to_data.session = to_dealer.session = sid
            return session.model_owner(to_data, to_dealer, model.plan, model.weights)

        _run("model-owner", [to_data, to_dealer], record, body)


@dataclass
class _Pending:
    """A session a model owner opened at the dealer, waiting for its data owner."""

    data_owner: str  # the certificate fingerprint the model owner admitted
    joined: threading.Event = field(default_factory=threading.Event)
    channel: Channel | None = None
    peer: PeerId | None = None


class DealerService:
    """Pairs each model owner's session with the data owner it names; serves correlations."""

    def __init__(self, cfg: ServiceConfig, audit: AuditLog) -> None:
        self.cfg = cfg
        self._lock = threading.Lock()
        self._pending: dict[bytes, _Pending] = {}
        self.service = Service(cfg, self.admit, self.handle, audit)

    def admit(self, peer: PeerId) -> tuple[str, str] | None:
        if peer.role == "data-owner":
            return None  # may only join a session a model owner opened for its certificate
        if peer.role != "model-owner":
            return "wrong-role", f"dealer refused a certificate issued to {peer.role!r}; expected model-owner or data-owner"
        if not allowed(peer, self.cfg.allow):
            return "not-allowed", f"dealer does not admit {peer.org or 'this model owner'!r} ({peer.fingerprint}): not on its allow-list"
        return None

    def handle(self, svc: Service, peer: PeerId, tls: ssl.SSLSocket) -> None:
        ch = TlsChannel("dealer", peer.role, ZERO_SESSION, tls, self.cfg.timeout_s)
        ch.max_frame = HANDSHAKE_FRAME  # raised once the session is paired
        record: dict[str, Any] = {"time": now_iso(), "service": "dealer", "peer": peer.audit()}
        try:
            if peer.role == "data-owner":
                if not self._join(peer, ch, record):
                    svc.audit.write(record)  # a joined data owner is in the model owner's record
                return
            self._open(svc, peer, ch, record)
            svc.audit.write(record)
        except BaseException:
            svc.audit.write(record)
            raise

    def _refuse(self, ch: Channel, record: dict[str, Any], code: str, error: str) -> None:
        record.update(outcome="refused", code=code, error=error)
        try:
            wire.reply(ch, code, error)
        except PrivmedError:
            pass
        ch.close(flush_s=2.0)

    def _join(self, peer: PeerId, ch: TlsChannel, record: dict[str, Any]) -> bool:
        """Hand ``ch`` to the session it names (True), or refuse it (False)."""
        try:
            msg = wire.receive(ch, wire.JOIN, self.cfg.connect_timeout_s)
        except PrivmedError as exc:
            record.update(outcome="failed", error=str(exc))
            ch.close(flush_s=1.0)
            return False
        sid = bytes.fromhex(msg["session"])
        with self._lock:
            pending = self._pending.get(sid)
            if pending is not None and pending.data_owner == peer.fingerprint:
                del self._pending[sid]
                pending.channel, pending.peer = ch, peer
        if pending is None:
            self._refuse(ch, record, "unknown-session", "no session with this id is waiting at the dealer")
            return False
        if pending.channel is not ch:
            self._refuse(ch, record, "not-allowed", "this session was opened for another data owner's certificate")
            return False
        ch.max_frame = self.cfg.max_frame_bytes  # admitted: session messages may follow at once
        try:
            wire.reply(ch, "ok", session=msg["session"])
        except PrivmedError:
            pass  # the channel is the session's now: it reports the loss and closes it
        pending.joined.set()
        return True

    def _open(self, svc: Service, peer: PeerId, to_model: TlsChannel, record: dict[str, Any]) -> None:
        ct = self.cfg.connect_timeout_s
        try:
            msg = wire.receive(to_model, wire.OPEN, ct)
        except PrivmedError as exc:
            record.update(outcome="failed", error=str(exc))
            to_model.close(flush_s=1.0)
            return
        sid = bytes.fromhex(msg["session"])
        record.update(session=msg["session"], model=msg["model"], plan=msg["plan"], data_owner=msg["data_owner"])
        refusal = svc.reserve(peer)
        if refusal is not None:
            return self._refuse(to_model, record, *refusal)
        pending = _Pending(msg["data_owner"])
        try:
            with self._lock:
                clash = sid in self._pending
                if not clash:
                    self._pending[sid] = pending
            if clash:  # 2^-128 by chance: a model owner reusing an id is refused
                return self._refuse(to_model, record, "unknown-session", "this session id is already waiting")
            to_model.max_frame = self.cfg.max_frame_bytes  # the plan follows the reply at once
            wire.reply(to_model, "ok", session=msg["session"])
            deadline = time.monotonic() + ct
            while not pending.joined.wait(JOIN_POLL_S) and time.monotonic() < deadline and to_model.alive():
                pass  # the model owner may give up first (its data owner left): free the slot then
            if not pending.joined.is_set():
                with self._lock:
                    timed_out = self._pending.pop(sid, None) is pending
                if timed_out or not pending.joined.wait(5.0):
                    err = PeerError(f"the data owner did not join session {msg['session'][:8]} at the dealer within {ct:.0f}s"
                                    if to_model.alive() else "the model owner left the session before its data owner joined")
                    record.update(outcome="failed", error=str(err))
                    to_model.abort(f"dealer failed: {err}")
                    to_model.close(flush_s=2.0)
                    return
            to_data = pending.channel
            if to_data is None or pending.peer is None or not isinstance(to_data, TlsChannel):
                raise ProtocolError("dealer: a joined session has no data owner channel")
            pending.channel = None  # the session owns it now
            to_data.move_to_group(to_model.group)
            to_data.session = to_model.session = sid
            record.update(data_owner_peer=pending.peer.audit())
            _run("dealer", [to_data, to_model], record, lambda: session.dealer(to_data, to_model))
        finally:
            with self._lock:  # whatever happened above: no session id stays registered,
                if self._pending.get(sid) is pending:
                    del self._pending[sid]
            if pending.channel is not None:  # and no joined data owner is left connected
                pending.channel.close(flush_s=1.0)
            svc.release(peer)
