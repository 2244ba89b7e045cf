"""Two-party sessions as processes: the session file without a dealer, the one TLS channel, a
role run, and ``run_local_session_2p`` (this process is the data owner; it starts only the
model owner).

Example two-party ``session.toml`` (paths relative to the file; no ``[dealer]`` table, and one
is refused so that a three-party file is not silently half-used)::

    [session]
    ca = "certs/ca.pem"
    timeout_s = 60
    connect_timeout_s = 30
    ot_engine = "ferret"      # optional: "ferret" (default) or "iknp"; both parties must agree

    [data-owner]
    cert = "certs/data-owner.pem"
    key = "certs/data-owner.key"

    [model-owner]
    host = "10.0.0.2"
    port = 7100
    cert = "certs/model-owner.pem"
    key = "certs/model-owner.key"

``ot_engine`` chooses the OT extension (``mpc.twoparty.protocols.OT_ENGINES``); the CLI's
``--ot-engine`` overrides it, and without either the environment's ``PRIVMED_2P_OT_ENGINE``,
else the default (Ferret), applies. Both parties state their engine at set-up and stop, naming
both, if they differ.

The model owner listens; the data owner connects (mutual TLS 1.3, certificates checked for
the peer's role name as in the three-party mode) and opens the session with a fresh id.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from privmed.crypto.certs import Identity, ephemeral_session, init_ca, issue
from privmed.crypto.csr import fingerprint_der
from privmed.errors import ConfigError, InputError
from privmed.mpc.twoparty.protocols import OT_ENGINES
from privmed.net.channel import Channel, FailureGroup
from privmed.net.tls import connect
from privmed.runtime.config import (
    SESSION_SCHEMA,
    Endpoint,
    Schema,
    SessionConfig,
    load_config,
    write_config,
)
from privmed.runtime.launch import SessionResult, check_input, model_owner_args, run_with_children
from privmed.runtime.memory import keep_freed_memory
from privmed.runtime.party import _await_hello, _channel, _hello, _listen, _resolve_port
from privmed.runtime.twoparty import data_owner_2p, merge_two, model_owner_2p
from privmed.runtime.twoparty_precompute import data_owner_precompute, model_owner_precompute
from privmed.runtime.twoparty_store import check_writable, open_use

ROLES_2P = ("data-owner", "model-owner")
_SESSION_2P: Schema = {**SESSION_SCHEMA, "ot_engine": (str, False)}


def check_ot_engine(engine: str | None, where: str) -> str | None:
    """``engine`` if it names an OT engine (or is None), else a one-line ConfigError."""
    if engine is not None and engine not in OT_ENGINES:
        raise ConfigError(f"{where}: 'ot_engine' must be one of {', '.join(repr(e) for e in OT_ENGINES)}, got {engine!r}")
    return engine


def load_config_2p(path: Path) -> SessionConfig:
    """A two-party session file (see the module docstring); one-line errors naming the table,
    and for ``ot_engine`` the file and the bad value."""
    cfg = load_config(path, ROLES_2P, _SESSION_2P)
    check_ot_engine(cfg.options.get("ot_engine"), f"{path} [session]")
    return cfg


def write_config_2p(path: Path, identities: dict[str, Identity], model_owner: Endpoint, timeout_s: float, connect_timeout_s: float,
                    ot_engine: str | None = None) -> None:  # fmt: skip
    """Write a two-party session file (local runs); ``ot_engine`` only if given."""
    options = {"ot_engine": ot_engine} if ot_engine is not None and check_ot_engine(ot_engine, str(path)) else None
    write_config(path, identities, {"model-owner": model_owner}, timeout_s, connect_timeout_s, ROLES_2P, options)


def connect_two(role: str, cfg: SessionConfig, on_listening: Callable[[], None] | None = None) -> tuple[Channel, str]:
    """This role's one channel and the peer's certificate fingerprint (``sha256:<hex>`` of its
    DER, what a store is bound to): the model owner listens and accepts only the data owner's
    certificate; the data owner connects and sends a fresh 16-byte session id."""
    deadline = time.monotonic() + cfg.connect_timeout_s
    ident = cfg.identities[role]
    group = FailureGroup()
    if role == "data-owner":
        ep = cfg.endpoints["model-owner"]
        port = _resolve_port(ep, deadline, "model-owner")
        sock = connect(ident, "model-owner", ep.host, port, max(0.1, deadline - time.monotonic()))
        peer = fingerprint_der(sock.getpeercert(binary_form=True) or b"")  # before the channel's I/O thread owns it
        ch = _channel(role, "model-owner", sock, cfg, group)
        _hello(ch, os.urandom(16))
        return ch, peer
    if role != "model-owner":
        raise ConfigError(f"role {role!r} does not exist in a two-party session (data-owner or model-owner)")
    lst = _listen(cfg, role)
    try:
        if on_listening:
            on_listening()
        _, sock = lst.accept({"data-owner"}, max(0.1, deadline - time.monotonic()))
        peer = fingerprint_der(sock.getpeercert(binary_form=True) or b"")
        ch = _channel(role, "data-owner", sock, cfg, group)
        _await_hello(ch, cfg.connect_timeout_s)
        return ch, peer
    finally:
        lst.close()


def run_role_2p(
    role: str,
    cfg: SessionConfig,
    *,
    plan_and_weights: tuple[Any, Any] | Callable[[], tuple[Any, Any]] | None = None,
    x: np.ndarray | None = None,
    chunk: int | None = None,
    progress: Callable[..., None] | None = None,
    expect_plan: str | None = None,
    on_plan: Callable[[Any], None] | None = None,
    store: Path | None = None,
    precompute: int | None = None,
    ot_engine: str | None = None,
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """``runtime.party.run_role`` for the two-party mode (same arguments and results).

    ``ot_engine`` (``--ot-engine``) overrides the session file's ``[session] ot_engine``.

    ``store``: this party's directory of precomputed sets (``twoparty_store``). With
    ``precompute`` N, a precompute session fills it (no input; the data owner's ``chunk`` is
    the batch size of a set, default 1) and returns (None, stats); without, batches use
    matching sets when the peer holds them too, else compute their offline phase inline."""
    keep_freed_memory()  # as ``run_role`` (``privmed.runtime.memory``)
    if precompute is not None:
        if store is None:
            raise InputError("--precompute needs --store DIR (where this party keeps its part)")
        check_writable(store)  # before connecting: unused sets would be lost
    engine = check_ot_engine(ot_engine, "--ot-engine") or cfg.options.get("ot_engine")
    compiled: list[tuple[Any, Any]] = []

    def prepare() -> None:
        compiled.append(plan_and_weights() if callable(plan_and_weights) else plan_and_weights)  # type: ignore[arg-type]

    ch, peer = connect_two(role, cfg, prepare if role == "model-owner" else None)
    failed = False
    try:
        if role == "data-owner" and precompute is not None and store is not None:
            return None, data_owner_precompute(ch, store, precompute, chunk or 1, peer, expect_plan, on_plan, ot_engine=engine)
        if role == "data-owner":
            if x is None:
                raise InputError("the data owner needs an input")
            step = chunk or len(x)
            parts = [x[i : i + step] for i in range(0, len(x), step)]
            use = open_use(store, role, peer)
            try:
                return data_owner_2p(ch, iter(parts), progress, len(parts), expect_plan=expect_plan, on_plan=on_plan, store=use,
                                     ot_engine=engine)  # fmt: skip
            finally:
                if use:
                    use.close()
        if not compiled or compiled[0] is None:
            raise InputError("the model owner needs a model")
        if precompute is not None and store is not None:
            return None, model_owner_precompute(ch, *compiled[0], store, precompute, peer, ot_engine=engine)
        use = open_use(store, role, peer)
        try:
            return None, model_owner_2p(ch, *compiled[0], progress=progress, store=use, ot_engine=engine)
        finally:
            if use:
                use.close()
    except BaseException as exc:
        failed = True
        ch.abort(f"{role} failed: {exc}")
        raise
    finally:
        ch.close(flush_s=2.0 if failed else None)


def run_local_session_2p(
    model_path: Path,
    inputs: np.ndarray | None,
    *,
    timeout_s: float = 120.0,
    workdir: Path | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    calibration: Path | None = None,
    frac_bits: int | None = None,
    input_shape: list[int] | None = None,
    chunk: int | None = None,
    stall_s: float | None = None,
    expect_plan: str | None = None,
    store: Path | None = None,
    precompute: int | None = None,
    ot_engine: str | None = None,
) -> SessionResult:
    """``runtime.launch.run_local_session`` without a dealer: this process is the data owner,
    the model owner is one child process (``privmed party --parties 2 --role model-owner``),
    TCP + mutual TLS on 127.0.0.1 with an OS-assigned port and an ephemeral CA.

    With ``store`` (``privmed infer --parties 2 --store DIR``): each role keeps its own store
    in ``DIR/data-owner`` and ``DIR/model-owner``, and the CA and both certificates live in
    ``DIR/pki`` (made on first use, one year) so that a later run presents the same peer
    certificates the store is bound to. With ``precompute`` N, ``inputs`` is None and the run
    fills the stores (N batches of ``chunk`` images, default 1); its outputs are empty.
    ``ot_engine`` goes into the session file both roles read (``--ot-engine``)."""
    check_ot_engine(ot_engine, "--ot-engine")
    store = Path(store).resolve() if store is not None else None  # the session file and the child name it
    if precompute is not None:
        if store is None:
            raise InputError("--precompute needs --store DIR")
        check_input(Path(model_path), np.zeros((1, *(input_shape or _model_shape(model_path))), np.float32), input_shape)
        for role in ROLES_2P:
            check_writable(store / role)
        x = None
    else:
        x = np.ascontiguousarray(inputs, dtype=np.float32) if isinstance(inputs, np.ndarray) and inputs.dtype.kind == "f" else inputs
        check_input(Path(model_path), x, input_shape)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="privmed-2p-", dir=workdir) as tmp_s:
        tmp = Path(tmp_s)
        ids = local_identities(store / "pki") if store else ephemeral_session(tmp / "certs")
        write_config_2p(tmp / "session.toml", ids, Endpoint("127.0.0.1", 0, tmp / "model-owner.port"), timeout_s, min(60.0, timeout_s),
                        ot_engine)  # fmt: skip
        mo_args = model_owner_args(model_path, calibration, frac_bits, input_shape)
        if store:
            mo_args += ["--store", str(store / "model-owner")] + (["--precompute", str(precompute)] if precompute else [])
        do_store = store / "data-owner" if store else None

        def data_owner(relay: Callable[..., None]) -> tuple[np.ndarray | None, dict[str, Any]]:
            out, stats = run_role_2p("data-owner", load_config_2p(tmp / "session.toml"), x=x, chunk=chunk, progress=relay,
                                     expect_plan=expect_plan, store=do_store, precompute=precompute)  # fmt: skip
            return (out if out is not None else np.zeros((0,), np.float32)), stats  # a precompute run has no output

        out, stats = run_with_children(tmp, ["--parties", "2"], {"model-owner": mo_args}, data_owner, progress, timeout_s, stall_s)
    merged = merge_two(stats, time.perf_counter() - t0)
    return SessionResult(out, merged)


def _model_shape(model_path: Path) -> list[int]:
    from privmed.compiler import onnx_front

    return list(onnx_front.load(Path(model_path), None).input_shape)


def local_identities(pki: Path) -> dict[str, Identity]:
    """A local CA and the two roles' certificates kept in ``pki`` (made on first use): local
    runs with a store need the same peer certificates every time."""
    if not (pki / "ca.pem").exists():
        init_ca(pki, name="privmed local store CA", days=365)
        return {role: issue(pki, role, days=365) for role in ROLES_2P}
    ids = {role: Identity(role, pki / f"{role}.pem", pki / f"{role}.key", pki / "ca.pem") for role in ROLES_2P}
    for ident in ids.values():
        if not ident.cert.exists() or not ident.key.exists():
            raise ConfigError(f"{pki}: the local CA has no {ident.name} certificate ({ident.cert.name}, {ident.key.name})")
    return ids
