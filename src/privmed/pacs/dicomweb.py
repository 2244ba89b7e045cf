"""DICOMweb against a PACS with dicomweb-client: QIDO-RS (find), WADO-RS (get), STOW-RS (store).

The same four calls as ``privmed.pacs.dimse`` (``echo``, ``find``, ``get``, ``store``), with
the same arguments, results and one-line ``PeerError``s, for a PACS reached over HTTP(S)
(e.g. Orthanc with its DICOMweb plugin at ``http://host:8042/dicom-web``). Every request has
the configuration's timeout; HTTPS certificates are checked by ``requests`` (``tls_ca``
names a CA bundle). Retrieved objects are written as ``DEST/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``
with the same UID checks as the DIMSE path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from privmed.errors import ConfigError, InputError, PeerError

__all__ = ["DicomwebConfig", "echo", "find", "get", "store"]

log = logging.getLogger(__name__)
T = TypeVar("T")
VERBS = {"echo": "a QIDO-RS query", "get": "WADO-RS", "store": "STOW-RS"}  # how messages name each call


@dataclass(frozen=True)
class DicomwebConfig:
    """A DICOMweb service root (``http(s)://host:port/prefix``), a timeout, an optional CA bundle."""

    url: str
    timeout_s: float = 30.0
    tls_ca: Path | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"--dicomweb {self.url!r}: expected an http:// or https:// URL")

    @property
    def name(self) -> str:
        return f"DICOMweb {self.url}"


def _client(cfg: DicomwebConfig) -> Any:
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    if cfg.tls_ca is not None:
        session.verify = str(cfg.tls_ca)
    return DICOMwebClient(url=cfg.url.rstrip("/"), session=session, timeout=cfg.timeout_s)


@contextmanager
def _errors(cfg: DicomwebConfig, what: str) -> Iterator[None]:
    """Turn requests' exceptions into one PeerError line naming the service and the request."""
    import requests

    try:
        yield
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        raise PeerError(f"{cfg.name}: {what} failed with HTTP {code}") from None
    except requests.exceptions.Timeout:
        raise PeerError(f"{cfg.name}: no answer to {what} within {cfg.timeout_s:g} s") from None
    except requests.exceptions.ConnectionError as exc:
        reason = "Connection refused" if "refused" in str(exc).lower() else exc.__class__.__name__
        raise PeerError(f"{cfg.name}: not reachable ({reason}); is it running and is the URL right?") from None


def _call(cfg: DicomwebConfig, what: str, fn: Callable[[], T]) -> T:
    with _errors(cfg, what):
        return fn()
    raise AssertionError("unreachable")  # pragma: no cover - _errors re-raises


def echo(cfg: DicomwebConfig) -> None:
    """A QIDO-RS study search limited to one result: PeerError unless the service answers."""
    client = _client(cfg)
    _call(cfg, "QIDO-RS", lambda: client.search_for_studies(limit=1))


def find(cfg: DicomwebConfig, level: str, **keys: str) -> list[dict[str, str]]:
    """QIDO-RS at ``STUDY``/``SERIES``/``IMAGE`` level: one dict per match (as ``dimse.find``)."""
    from pydicom.dataset import Dataset

    from privmed.pacs.dimse import FIND_KEYS, _text

    level = level.upper()
    if level not in FIND_KEYS:
        raise InputError(f"QIDO level {level!r}: expected one of {', '.join(FIND_KEYS)}")
    client = _client(cfg)
    fields = list(dict.fromkeys([*FIND_KEYS[level], *keys]))
    filters = dict(keys)
    search: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "STUDY": lambda: client.search_for_studies(fields=fields, search_filters=filters),
        "SERIES": lambda: client.search_for_series(fields=fields, search_filters=filters),
        "IMAGE": lambda: client.search_for_instances(fields=fields, search_filters=filters),
    }
    found = _call(cfg, "QIDO-RS", search[level])
    matches = []
    for item in found:
        ds = Dataset.from_json(item)
        matches.append({k: _text(ds.get(k)) for k in fields})
    return matches


def get(cfg: DicomwebConfig, dest: Path, study_uid: str, series_uid: str | None = None) -> list[Path]:
    """WADO-RS a study (or one series) into ``dest``; returns the files written."""
    from privmed.pacs.dimse import UID_RE

    client = _client(cfg)
    what = f"series {series_uid}" if series_uid else f"study {study_uid}"
    if series_uid:
        datasets = _call(cfg, f"WADO-RS of {what}", lambda: client.retrieve_series(study_uid, series_uid))
    else:
        datasets = _call(cfg, f"WADO-RS of {what}", lambda: client.retrieve_study(study_uid))
    written = []
    for ds in datasets:
        series, sop = str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
        if not (UID_RE.match(series) and UID_RE.match(sop)):
            raise PeerError(f"{cfg.name}: sent an object whose UIDs {series[:70]!r}/{sop[:70]!r} are not UIDs")
        folder = Path(dest) / series
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{sop}.dcm"
        ds.save_as(str(path), enforce_file_format=True)
        written.append(path)
    if not written:
        raise PeerError(f"{cfg.name}: WADO-RS of {what}: nothing matched")
    return written


def store(cfg: DicomwebConfig, files: Sequence[Path]) -> int:
    """STOW-RS every file (one request); returns how many the service stored."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(str(f)))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise InputError(f"{f}: not a DICOM file to store ({exc.__class__.__name__}: {exc})") from None
    client = _client(cfg)
    response = _call(cfg, "STOW-RS", lambda: client.store_instances(datasets))
    failed = response.get("FailedSOPSequence") if response is not None else None
    if failed:
        reason = failed[0].get("FailureReason", "?")
        raise PeerError(f"{cfg.name}: STOW-RS refused {len(failed)} of {len(datasets)} objects (first reason {reason})")
    return len(datasets)
