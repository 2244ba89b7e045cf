"""Keyed pseudonyms: how privmed names an image in anything it writes (results, reports, logs).

``pseudonym = "img-" + hex(HMAC-SHA256(key, identity))[:16]`` where the identity of an image
is its DICOM SOPInstanceUID when it has one, else its path relative to the study folder (and
the array row for MedMNIST). The 256-bit key is the data owner's: kept in a file outside the
results (default ``~/.config/privmed/pseudonym.key``, mode 0600, created on first use), so
whoever reads a results folder or a report cannot go back from a pseudonym to a patient or
a file name, while the data owner can (``privmed data pseudonym``) and a resumed study gets
the same names again. 64 bits of HMAC output make a collision within a study of n images
about n^2 / 2^65 likely: 3e-8 for a million images.

The key is never logged; ``key_id`` (an HMAC of a fixed label) identifies it in a results
store so that resuming with another key is refused instead of counting images twice.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from privmed.errors import ConfigError

__all__ = ["Pseudonymizer", "default_key_path", "load_or_create_key", "image_identity", "pseudonymise_study"]

KEY_BYTES = 32


def default_key_path() -> Path:
    """``$PRIVMED_PSEUDONYM_KEY`` or ``$XDG_CONFIG_HOME/privmed/pseudonym.key`` (~/.config)."""
    if os.environ.get("PRIVMED_PSEUDONYM_KEY"):
        return Path(os.environ["PRIVMED_PSEUDONYM_KEY"])
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "privmed" / "pseudonym.key"


def load_or_create_key(path: Path | None = None) -> bytes:
    """The key in ``path`` (64 hex digits); a new random one written there (0600) if absent."""
    p = Path(path) if path is not None else default_key_path()
    if not p.exists():  # written whole under a temporary name, then linked: no half-written key
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(KEY_BYTES) + "\n")
        try:
            os.link(tmp, p)
        except FileExistsError:
            pass  # another process made the key first: use that one
        finally:
            tmp.unlink()
    try:
        text = p.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read the pseudonym key ({exc.strerror})") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"{p}: expected a pseudonym key of {2 * KEY_BYTES} hex digits")
    return key


def image_identity(path: Path, root: Path | None = None, row: str | None = None) -> str:
    """What a pseudonym is computed from: ``sop:<SOPInstanceUID>`` for DICOM, else the path
    relative to ``root`` (absolute if outside it), plus ``#row`` for an array row."""
    from privmed.data.readers import image_kind

    if image_kind(path) == "dicom":
        import pydicom
        from pydicom.errors import InvalidDicomError

        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uid = str(ds.get("SOPInstanceUID", "") or "")
        except (InvalidDicomError, OSError, EOFError, ValueError):
            uid = ""  # unreadable: named by its path; the reader will report the problem
        if uid:
            return f"sop:{uid}"
    p = Path(path).resolve()
    if root is not None:
        try:
            p = p.relative_to(Path(root).resolve())
        except ValueError:
            pass
    return f"path:{p.as_posix()}" + (f"#{row}" if row is not None else "")


class Pseudonymizer:
    """Pseudonyms under one key, and the texts they stand for (to scrub messages)."""

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigError(f"pseudonym key: expected {KEY_BYTES} bytes, got {len(key)}")
        self._key = key
        self._hidden: dict[str, str] = {}  # text that identifies -> its pseudonym

    @property
    def key_id(self) -> str:
        return hmac.new(self._key, b"privmed pseudonym key id", hashlib.sha256).hexdigest()[:16]

    def of(self, identity: str, prefix: str = "img") -> str:
        return f"{prefix}-" + hmac.new(self._key, identity.encode(), hashlib.sha256).hexdigest()[:16]

    def hide(self, name: str, texts: Iterable[str]) -> None:
        """Remember that each of ``texts`` (a path, a file name, an original id) means ``name``."""
        for text in texts:
            if text and len(text) >= 3:  # never rewrite short fragments inside other words
                self._hidden[text] = name

    def scrub(self, message: str) -> str:
        """``message`` with every remembered text replaced by its pseudonym (longest first)."""
        for text in sorted(self._hidden, key=len, reverse=True):
            if text in message:
                message = message.replace(text, self._hidden[text])
        return message


def pseudonymise_study(study: Any, pseudonyms: Pseudonymizer) -> None:
    """Give every record of ``study`` its pseudonym as ``image_id`` (in place).

    The paths, file names and original ids are remembered by ``pseudonyms`` so that messages
    about a record can be scrubbed; skipped files become ``file-...`` pseudonyms with their
    reasons scrubbed. Record paths stay (in memory) so the images can still be read.
    """
    from dataclasses import replace

    records = []
    for r in study.records:
        row = f"{r.array_key}:{r.index}" if getattr(r, "array_key", None) is not None else None
        name = pseudonyms.of(image_identity(r.path, study.root, row))
        file_name = name if row is None else pseudonyms.of(image_identity(r.path, study.root), "file")
        pseudonyms.hide(file_name, [str(r.path), str(Path(r.path).resolve()), Path(r.path).name])
        pseudonyms.hide(name, [str(r.image_id)])
        records.append(replace(r, image_id=name))
    skipped = []
    for path, _ in study.skipped:
        pseudonyms.hide(pseudonyms.of(image_identity(Path(path), study.root), "file"),
                        [str(path), str(Path(path).resolve()), Path(path).name])  # fmt: skip
    for path, why in study.skipped:
        skipped.append((pseudonyms.scrub(str(path)), pseudonyms.scrub(why)))
    study.records, study.skipped = records, skipped
