"""DIMSE services against a PACS with pynetdicom: C-ECHO, C-FIND, C-GET, C-STORE.

Every call opens one association, does its work and releases it. Every wait is bounded by
``PacsConfig.timeout_s`` (TCP connect, association, each DIMSE response). Failures raise
``PeerError`` with one line that names the PACS as ``AET@host:port`` and what went wrong:
not reachable, association rejected (AE titles), a failure status (hex code and comment),
or no response within the deadline.

Retrieval uses C-GET (the objects come back on the same association; the PACS needs no
route back to us, unlike C-MOVE). Received objects are written as
``DEST/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``; UIDs that are not plain UIDs (digits
and dots) are refused as file names, so a hostile PACS cannot write outside DEST.
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from privmed.errors import InputError, PeerError
from privmed.pacs.config import PacsConfig

__all__ = ["echo", "find", "get", "store", "RETRIEVE_STORAGE_CLASSES"]

log = logging.getLogger(__name__)

UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
VERBS = {"echo": "C-ECHO", "get": "C-GET", "store": "C-STORE"}  # how messages name each call
VERIFICATION = "1.2.840.10008.1.1"  # Verification SOP class (C-ECHO)
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"  # Study Root Query/Retrieve Information Model - GET
# what `get` accepts back (SCP role for C-STORE sub-operations): images privmed reads and its results
RETRIEVE_STORAGE_CLASSES = (
    "CTImageStorage", "EnhancedCTImageStorage", "MRImageStorage", "EnhancedMRImageStorage",
    "ComputedRadiographyImageStorage", "DigitalXRayImageStorageForPresentation",
    "DigitalXRayImageStorageForProcessing", "SecondaryCaptureImageStorage", "SegmentationStorage",
    "ComprehensiveSRStorage", "Comprehensive3DSRStorage", "EnhancedSRStorage", "BasicTextSRStorage",
)  # fmt: skip
# explicit and implicit VR little endian, plus lossless codecs pydicom decodes here:
# RLE (pydicom itself) and JPEG 2000 lossless (pylibjpeg-openjpeg)
TRANSFER_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.90")
FIND_KEYS = {
    "STUDY": ("StudyInstanceUID", "StudyDate", "StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
               "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}  # fmt: skip


def _ae(cfg: PacsConfig) -> Any:
    from pynetdicom import AE

    ae = AE(ae_title=cfg.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = cfg.timeout_s
    return ae


def _tls_args(cfg: PacsConfig) -> tuple[ssl.SSLContext, str] | None:
    if cfg.tls_ca is None:
        return None
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.tls_ca))
        if cfg.tls_cert is not None:
            context.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key) if cfg.tls_key else None)
    except (OSError, ssl.SSLError) as exc:
        raise PeerError(f"PACS {cfg.name}: TLS files unusable ({exc})") from None
    return context, cfg.host


@contextmanager
def _association(cfg: PacsConfig, ae: Any, **kwargs: Any) -> Iterator[Any]:
    """An established association (released on exit), or PeerError saying why not."""
    tls = _tls_args(cfg)
    try:  # pynetdicom only logs why a connection failed: find out ourselves, within the deadline
        with socket.create_connection((cfg.host, cfg.port), timeout=cfg.timeout_s) as probe:
            if tls is not None:  # the handshake alone: is the PACS's certificate one we trust?
                tls[0].wrap_socket(probe, server_hostname=tls[1]).close()
    except ssl.SSLCertVerificationError as exc:
        raise PeerError(f"PACS {cfg.name}: its TLS certificate is not trusted ({exc.verify_message})") from None
    except ssl.SSLError as exc:
        raise PeerError(f"PACS {cfg.name}: TLS handshake failed ({exc.reason or exc})") from None
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise PeerError(f"PACS {cfg.name}: not reachable ({reason}); is it running and is the port right?") from None
    t0 = time.monotonic()
    assoc = ae.associate(cfg.host, cfg.port, ae_title=cfg.aet, tls_args=tls, **kwargs)
    if not (assoc.is_established or assoc.is_rejected) and time.monotonic() - t0 < cfg.timeout_s / 2:
        # dropped before any answer (a busy PACS can close a new connection): one more try
        # within the same deadline; a PACS that wants TLS drops the second one the same way
        time.sleep(0.5)
        assoc = ae.associate(cfg.host, cfg.port, ae_title=cfg.aet, tls_args=tls, **kwargs)
    if not assoc.is_established:
        if assoc.is_rejected:
            why = f"rejected the association from {cfg.calling_aet!r} (does it know this AE title, and is it called {cfg.aet!r}?)"
        elif time.monotonic() - t0 < cfg.timeout_s:
            hint = "does it accept our TLS certificate?" if tls else "does it require TLS?"
            why = f"closed the connection without an association ({hint})"
        else:
            why = f"no association within {cfg.timeout_s:g} s"
        raise PeerError(f"PACS {cfg.name}: {why}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _check_status(cfg: PacsConfig, what: str, status: Any, ok: Sequence[int] = (0x0000,)) -> int:
    if status is None or "Status" not in status:
        raise PeerError(f"PACS {cfg.name}: no {what} response within {cfg.timeout_s:g} s (or the association was aborted)")
    code = int(status.Status)
    if code not in ok:
        comment = str(status.get("ErrorComment", "") or "").strip()
        raise PeerError(f"PACS {cfg.name}: {what} failed with status 0x{code:04X}" + (f" ({comment})" if comment else ""))
    return code


def echo(cfg: PacsConfig) -> None:
    """C-ECHO: PeerError unless the PACS answers with success."""
    ae = _ae(cfg)
    ae.add_requested_context(VERIFICATION)
    with _association(cfg, ae) as assoc:
        _check_status(cfg, "C-ECHO", assoc.send_c_echo())


def find(cfg: PacsConfig, level: str, **keys: str) -> list[dict[str, str]]:
    """C-FIND (study root) at ``STUDY``/``SERIES``/``IMAGE`` level: one dict per match.

    ``keys`` are matching values (DICOM keywords, e.g. ``StudyInstanceUID=...``,
    ``Modality="SEG"``); the level's usual return keys are asked for as well.
    """
    from pydicom.dataset import Dataset

    level = level.upper()
    if level not in FIND_KEYS:
        raise InputError(f"C-FIND level {level!r}: expected one of {', '.join(FIND_KEYS)}")
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword in (*FIND_KEYS[level], *keys):
        try:
            setattr(query, keyword, keys.get(keyword, ""))
        except (ValueError, TypeError) as exc:
            raise InputError(f"C-FIND key {keyword}: {exc}") from None
    ae = _ae(cfg)
    ae.add_requested_context(STUDY_ROOT_FIND)
    matches = []
    with _association(cfg, ae) as assoc:
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
            code = _check_status(cfg, "C-FIND", status, ok=(0x0000, 0xFF00, 0xFF01))
            if code in (0xFF00, 0xFF01) and identifier is not None:
                matches.append({k: _text(identifier.get(k)) for k in (*FIND_KEYS[level], *keys)})
    return matches


def _text(value: Any) -> str:
    """A returned attribute as text; multi-valued ones (ModalitiesInStudy) joined with '/'."""
    if value is None:
        return ""
    if value.__class__.__name__ == "MultiValue" or isinstance(value, (list, tuple)):
        return "/".join(str(v) for v in value)
    return str(value)


def _safe_uid(value: Any, what: str, cfg: PacsConfig) -> str:
    text = str(value or "")
    if not UID_RE.match(text) or len(text) > 64:
        raise PeerError(f"PACS {cfg.name}: sent an object whose {what} {text[:70]!r} is not a UID")
    return text


def get(cfg: PacsConfig, dest: Path, study_uid: str, series_uid: str | None = None) -> list[Path]:
    """C-GET a study (or one series of it) into ``dest``; returns the files written."""
    from pydicom.dataset import Dataset
    from pynetdicom import build_role, evt, sop_class

    dest = Path(dest)
    written: list[Path] = []
    problems: list[str] = []

    def on_store(event: Any) -> int:
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
            folder = dest / _safe_uid(ds.get("SeriesInstanceUID"), "SeriesInstanceUID", cfg)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{_safe_uid(ds.get('SOPInstanceUID'), 'SOPInstanceUID', cfg)}.dcm"
            ds.save_as(str(path), enforce_file_format=True)
        except (PeerError, OSError, ValueError, AttributeError) as exc:
            problems.append(str(exc))
            return 0xA700  # out of resources: the PACS counts a failed sub-operation
        written.append(path)
        return 0x0000

    ae = _ae(cfg)
    ae.add_requested_context(STUDY_ROOT_GET)
    classes = [getattr(sop_class, name) for name in RETRIEVE_STORAGE_CLASSES]
    for uid in classes:
        ae.add_requested_context(uid, list(TRANSFER_SYNTAXES))
    roles = [build_role(uid, scp_role=True) for uid in classes]
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES" if series_uid else "STUDY"
    query.StudyInstanceUID = study_uid
    if series_uid:
        query.SeriesInstanceUID = series_uid
    what = f"series {series_uid}" if series_uid else f"study {study_uid}"
    with _association(cfg, ae, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
        final = None
        for status, _ in assoc.send_c_get(query, STUDY_ROOT_GET):
            final = status
            _check_status(cfg, f"C-GET of {what}", status, ok=(0x0000, 0xFF00, 0xB000))
    failed = int(final.get("NumberOfFailedSuboperations", 0) or 0) if final is not None else 0
    if problems or failed:
        detail = f": {problems[0]}" if problems else " (objects of a kind privmed does not accept?)"
        raise PeerError(f"PACS {cfg.name}: C-GET of {what}: {max(failed, len(problems))} objects not received{detail}")
    if not written:
        raise PeerError(f"PACS {cfg.name}: C-GET of {what}: nothing matched (no such {what.split()[0]} on this PACS)")
    return written


def store(cfg: PacsConfig, files: Sequence[Path]) -> int:
    """C-STORE every file (one association); returns how many were stored."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets = []
    for f in files:
        try:
            datasets.append((f, pydicom.dcmread(str(f))))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise InputError(f"{f}: not a DICOM file to store ({exc.__class__.__name__}: {exc})") from None
    contexts = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets})
    if len(contexts) > 128:
        raise InputError(f"{len(contexts)} kinds of objects in one C-STORE; at most 128 (DICOM presentation contexts)")
    ae = _ae(cfg)
    for sop, syntax in contexts:
        ae.add_requested_context(sop, [syntax])
    with _association(cfg, ae) as assoc:
        for f, ds in datasets:
            # 0xB000, 0xB007, 0xB006: stored with a warning (coercion, elements discarded)
            _check_status(cfg, f"C-STORE of {f.name}", assoc.send_c_store(ds), ok=(0x0000, 0xB000, 0xB006, 0xB007))
    return len(datasets)
