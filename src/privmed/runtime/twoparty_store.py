"""Precomputed two-party correlations on disk (issue 14, ``--precompute N --store DIR``).

Each party keeps only its own part, in its own directory (mode 0700), files mode 0600, no
pickle:

- ``store.json``: the binding and the inventory: store id (agreed by both parties: SHA-256 of
  16 random bytes from each), this party's role, the plan's fingerprint, the peer's
  certificate fingerprint (SHA-256 of its DER, as seen over mutual TLS), the batch size of a
  set, the rings, the indices of the sets made and of those used, the precompute run's costs.
- ``set-NNNN.npz`` (``numpy.savez``, read with ``allow_pickle=False``): one batch's material
  (``privmed.mpc.twoparty.stored``) and a ``meta`` array holding the same binding as JSON.

Use: a later session offers the next unused set (data owner), the model owner accepts it only
if its own store has the same id, binding and an unused set of that index; both then record
the index as used and delete the file *before* the online phase starts, so a correlation is
never used twice (a set file restored after use is refused by the owner's own record, and a
whole directory restored from a copy by the peer's). Everything read back is checked: the
manifest's fields and types, each set's binding against the manifest, every array against the
shapes the plan implies. A store that does not match the session (other plan, other peer,
other batch size, no set left) is not an error: the batch computes its offline phase inline
and the session's ``store`` note says why, in one line. A store that contradicts itself or
the plan (tampered, truncated, reused) is an error naming the file.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from privmed.errors import ProtocolError
from privmed.mpc.twoparty.stored import StoreError
from privmed.net.channel import Channel

FORMAT = "privmed-2p-store/1"
MANIFEST = "store.json"
BINDING = ("store", "role", "plan", "peer", "batch", "bits", "he_bits")
_TYPES: dict[str, type] = {"format": str, "store": str, "role": str, "plan": str, "peer": str, "batch": int, "bits": int,
                           "he_bits": int, "sets": list, "used": list, "precompute": dict}  # fmt: skip


def store_id(mine: bytes, theirs: bytes, is_data_owner: bool) -> str:
    """The id both parties derive from each one's 16 random bytes (neither chooses it alone)."""
    do, mo = (mine, theirs) if is_data_owner else (theirs, mine)
    return hashlib.sha256(b"privmed-2p-store" + do + mo).hexdigest()[:32]


def _write_private(path: Path, write: Any) -> None:
    """``write(fileobj)`` into ``path`` created 0600 from its first byte, atomically replaced."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _lock(root: Path) -> int:
    """An exclusive lock on ``root`` for this session (``DIR/.lock``, released by ``close`` or
    at exit): two sessions on one store at once could both offer the same set."""
    fd = os.open(root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{root}: in use by another session (one session at a time per store)") from None
    return fd


@dataclass
class Store:
    """One party's store: its directory and its manifest (see the module docstring)."""

    root: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    lock_fd: int | None = None

    def close(self) -> None:
        """Release the session's lock on the directory."""
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    @property
    def path(self) -> Path:
        return self.root / MANIFEST

    def set_path(self, index: int) -> Path:
        return self.root / f"set-{index:04d}.npz"

    @property
    def remaining(self) -> list[int]:
        return sorted(set(self.manifest["sets"]) - set(self.manifest["used"]))

    # -- creating ---------------------------------------------------------------------------
    @classmethod
    def create(cls, root: Path, binding: dict[str, Any]) -> Store:
        """A new empty store in ``root`` (refused if it holds unused sets of another store)."""
        check_writable(root)
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        fd = _lock(root)
        try:
            check_writable(root)  # again under the lock
            old = cls.open(root, str(binding["role"]))
            if old is not None:
                for index in old.manifest["sets"]:
                    old.set_path(index).unlink(missing_ok=True)
            store = cls(root, {"format": FORMAT, **binding, "sets": [], "used": [], "precompute": {}}, fd)
            store.save()
        except BaseException:
            os.close(fd)
            raise
        return store

    def save(self) -> None:
        _write_private(self.path, lambda f: f.write(json.dumps(self.manifest, indent=1).encode()))

    def add(self, index: int, arrays: dict[str, np.ndarray]) -> None:
        """Write set ``index`` (its arrays and the binding), then list it in the manifest."""
        meta = {k: self.manifest[k] for k in BINDING} | {"set": index}
        payload = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays}
        _write_private(self.set_path(index), lambda f: np.savez(f, allow_pickle=False, **payload))  # type: ignore[arg-type]
        self.manifest["sets"].append(index)
        self.save()

    # -- reading ----------------------------------------------------------------------------
    @classmethod
    def open(cls, root: Path, role: str, lock: bool = False) -> Store | None:
        """The store in ``root``, its manifest checked (with ``lock``: locked for this session
        first); None if there is none."""
        path = root / MANIFEST
        if not path.exists():
            return None
        fd = _lock(root) if lock else None
        try:
            store = cls._read(root, role)
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        store.lock_fd = fd
        return store

    @classmethod
    def _read(cls, root: Path, role: str) -> Store:
        path = root / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"{path}: not a readable store manifest ({exc})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise StoreError(f"{path}: not a {FORMAT} manifest")
        for key, kind in _TYPES.items():
            if not isinstance(manifest.get(key), kind) or (kind is int and isinstance(manifest[key], bool)):
                raise StoreError(f"{path}: field {key!r} missing or not a {kind.__name__}")
        for key in ("sets", "used"):
            if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 10000 for i in manifest[key]):
                raise StoreError(f"{path}: field {key!r} must list set indices 0..9999")
        if manifest["role"] != role:
            raise StoreError(f"{path}: a {manifest['role']} store, this party is the {role}")
        store = cls(root, manifest)
        for index in manifest["used"]:
            if store.set_path(index).exists():
                raise StoreError(f"{store.set_path(index)}: set {index} of store {manifest['store']} was already used; "
                                 "a correlation is never used twice (delete the file)")  # fmt: skip
        return store

    def mismatch(self, binding: dict[str, Any]) -> str | None:
        """Why this store cannot serve a batch with ``binding`` (plan, peer, batch, rings), or None."""
        m, where = self.manifest, f"store {self.root}"
        if m["plan"] != binding["plan"]:
            return f"{where} was precomputed for plan {m['plan'][:16]}, this session's plan is {binding['plan'][:16]}"
        if m["peer"] != binding["peer"]:
            return f"{where} was precomputed with another peer (certificate {m['peer'][:23]}, this one is {binding['peer'][:23]})"
        if m["batch"] != binding["batch"]:
            return f"{where} holds sets of batch size {m['batch']}, this batch has {binding['batch']}"
        if (m["bits"], m["he_bits"]) != (binding["bits"], binding["he_bits"]):
            raise StoreError(f"{self.path}: rings {m['bits']}/{m['he_bits']} bits, the plan implies {binding['bits']}/{binding['he_bits']}")
        if not self.remaining:
            return f"{where} has no precomputed set left ({len(m['used'])} used)"
        return None

    def load(self, index: int) -> dict[str, np.ndarray]:
        """Set ``index``'s arrays, its binding checked against the manifest (shapes: by the
        caller, against the plan)."""
        path = self.set_path(index)
        if index in self.manifest["used"]:
            raise StoreError(f"{path}: set {index} of store {self.manifest['store']} was already used; a correlation is never used twice")
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except (OSError, ValueError, EOFError) as exc:
            raise StoreError(f"{path}: not a readable set file ({exc})") from None
        raw = arrays.pop("meta", None)
        try:
            meta = json.loads(bytes(raw)) if raw is not None and raw.dtype == np.uint8 and raw.ndim == 1 else None
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise StoreError(f"{path}: no readable binding ('meta')")
        expected = {k: self.manifest[k] for k in BINDING} | {"set": index}
        for key, value in expected.items():
            if meta.get(key) != value:
                raise StoreError(f"{path}: bound to {key} {str(meta.get(key))[:40]!r}, its store {self.path} says {str(value)[:40]!r}")
        return arrays

    def consume(self, index: int) -> None:
        """Record ``index`` as used, then delete its file (before the material is used)."""
        self.manifest["used"].append(index)
        self.save()
        self.set_path(index).unlink(missing_ok=True)


def check_writable(root: Path) -> None:
    """Refuse, before any connection, to precompute into a directory that is not a store's or
    still holds unused sets (they would be lost; the peer would keep its halves)."""
    if root.exists() and not root.is_dir():
        raise StoreError(f"{root}: not a directory")
    if root.is_dir() and any(not p.name.startswith(".") for p in root.iterdir()) and not (root / MANIFEST).exists():
        raise StoreError(f"{root}: not empty and not a store; give an empty or new directory")
    if (root / MANIFEST).exists():
        try:
            manifest = json.loads((root / MANIFEST).read_text())
            left = sorted(set(manifest["sets"]) - set(manifest["used"]))
        except (OSError, ValueError, KeyError, TypeError):
            raise StoreError(f"{root / MANIFEST}: not a readable store manifest") from None
        if left:
            raise StoreError(f"{root}: holds {len(left)} unused precomputed sets of store {manifest.get('store')}; use them or give another --store")


def held_sets(root: Path, role: str = "data-owner") -> tuple[int, int] | None:
    """(batch size of a set, sets left) in this party's store ``root`` (its manifest checked as
    ``Store.open``, not locked), or None if ``root`` holds no store yet. Lets a local run size its
    batches to the sets before the session starts."""
    store = Store.open(root, role)
    return (int(store.manifest["batch"]), len(store.remaining)) if store is not None else None


@dataclass
class StoreUse:
    """A party's store during a session: what it is bound to now and what happened."""

    root: Path
    role: str
    peer: str  # the peer's certificate fingerprint in this session
    store: Store | None = None
    used: list[int] = field(default_factory=list)
    inline: int = 0  # batches whose offline phase ran inline
    note: str = ""  # the first reason a batch fell back, one line
    load_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        left = self.store.remaining if self.store else []
        return {"dir": str(self.root), "store": self.store.manifest["store"] if self.store else "", "used": self.used,
                "inline_batches": self.inline, "left": len(left), "note": self.note, "load_s": round(self.load_s, 4)}  # fmt: skip

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    def fell_back(self, reason: str) -> None:
        self.inline += 1
        if not self.note:
            self.note = f"{reason}; offline phase computed inline"


def open_use(root: Path | None, role: str, peer: str) -> StoreUse | None:
    """This party's store for a session with the peer whose certificate is ``peer`` (locked
    until ``StoreUse.close``); None without ``--store``."""
    if root is None:
        return None
    return StoreUse(root, role, peer, Store.open(root, role, lock=True))


# -- per batch: does this batch run on a stored set? ---------------------------------------
# the model owner's answer to an offer: 0 accepted, else why not (the data owner's note)
REFUSALS = {
    1: "the model owner has no store for this session",
    2: "the model owner's store is another one (precomputed in another run)",
    3: "the model owner's store does not match this session (plan, peer or batch size)",
    4: "the model owner has no such precomputed set left",
}
Build = Callable[[Path, dict[str, np.ndarray], str, int], Any]


def offer_set(ch: Channel, use: StoreUse | None, binding: dict[str, Any], build: Build) -> Any | None:
    """Data owner, after each batch size: offer the next unused set of its store (or none), and
    if the model owner accepts, consume it; returns ``build(path, arrays, store id, index)``
    (the checked material) or None (offline phase inline).

    1. Its store matches the session (``Store.mismatch``): load the set, check it
       (``build`` raises ``StoreError`` naming the file), send (store id, index); else send
       (zeros, -1).
    2. Receive the answer (1 byte); on 0 record the set as used and delete it.
    Rounds: 1 with an offer, else 0 (the message goes with the batch size). Bytes: 24 + 1.
    """
    index, built = -1, None
    store = use.store if use else None
    if use is not None and store is None:
        use.fell_back(f"store {use.root} is empty (nothing precomputed there)")
    elif use is not None and store is not None:
        reason = store.mismatch(binding)
        if reason:
            use.fell_back(reason)
        else:
            index = store.remaining[0]
            t0 = time.perf_counter()
            built = build(store.set_path(index), store.load(index), store.manifest["store"], index)
            use.load_s += time.perf_counter() - t0
    sid = bytes.fromhex(store.manifest["store"]) if index >= 0 and store else bytes(16)
    ch.send("store/offer", np.frombuffer(sid + np.array([index], "<i8").tobytes(), np.uint8))
    if index < 0:
        return None
    assert use is not None and store is not None
    code = int(ch.recv("store/accept", np.uint8, (1,))[0])
    if code:
        use.fell_back(REFUSALS.get(code, f"the model owner refused the precomputed set (code {code})"))
        return None
    store.consume(index)
    use.used.append(index)
    return built


def answer_offer(ch: Channel, use: StoreUse | None, binding: dict[str, Any], build: Build) -> Any | None:
    """Model owner, after each batch size: the data owner's offer; accept it if this party's
    store has the same id, matches the session and holds that set unused (checked by
    ``build``), then consume it. A set this party already used is refused as an error (a
    restored copy on the data owner's side), anything else falls back."""
    raw = ch.recv("store/offer", np.uint8, (24,))
    sid, index = bytes(raw[:16]).hex(), int(np.frombuffer(raw[16:].tobytes(), "<i8")[0])
    if index < 0:
        if use is not None:
            use.fell_back("the data owner offered no precomputed set")
        return None
    if index >= 10000:
        raise ProtocolError(f"data-owner offered precomputed set {index}: expected 0..9999")
    store = use.store if use else None
    code, built = 0, None
    if store is None:
        code = 1
    elif store.manifest["store"] != sid:
        code = 2
    elif index in store.manifest["used"]:
        raise StoreError(f"{store.path}: the data owner offered set {index} of store {sid}, which this party already used; "
                         "a correlation is never used twice")  # fmt: skip
    elif store.mismatch(binding):
        code = 3
    elif index not in store.manifest["sets"]:
        code = 4
    if code == 0 and store is not None and use is not None:
        t0 = time.perf_counter()
        built = build(store.set_path(index), store.load(index), sid, index)
        use.load_s += time.perf_counter() - t0
    ch.send("store/accept", np.array([code], np.uint8))
    if code:
        if use is not None:
            use.fell_back(REFUSALS[code].replace("the model owner has", "this party has").replace("the model owner's", "this party's"))
        return None
    assert use is not None and store is not None
    store.consume(index)
    use.used.append(index)
    return built
