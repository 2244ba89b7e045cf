"""`privmed pacs echo|find|get|store`, and the PACS options of `privmed infer` / `privmed segment`.

The PACS is named by ``--pacs HOST:PORT`` (+ ``--pacs-aet``, ``--aet``) or by the ``[pacs]``
table of ``--pacs-config FILE.toml`` (see ``privmed.pacs.config``) for DIMSE, or by
``--dicomweb URL`` for DICOMweb (QIDO-RS / WADO-RS / STOW-RS); the commands are the same. `infer` and `segment`
take ``--from-pacs STUDY_UID[/SERIES_UID]`` instead of ``--input`` (retrieved by C-GET into a
temporary folder, deleted afterwards) and ``--to-pacs`` to C-STORE the SR/SEG they wrote.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from privmed.errors import InputError


def add_pacs_options(p: argparse.ArgumentParser, job: bool = False) -> None:
    g = p.add_argument_group("PACS (DICOM DIMSE)")
    g.add_argument("--pacs", metavar="HOST:PORT", help="the PACS's DICOM address")
    g.add_argument("--pacs-aet", default="ORTHANC", help="the PACS's AE title (default ORTHANC)")
    g.add_argument("--aet", default="PRIVMED", help="our AE title (default PRIVMED)")
    g.add_argument("--pacs-timeout", type=float, default=30.0, help="seconds for connecting and each response (30)")
    g.add_argument("--pacs-config", type=Path, help="TOML file with a [pacs] table instead of the flags above")
    g.add_argument("--dicomweb", metavar="URL", help="a DICOMweb service root instead (e.g. http://pacs:8042/dicom-web)")
    if job:
        g.add_argument("--from-pacs", metavar="STUDY_UID[/SERIES_UID]",
                       help="retrieve the input from the PACS (C-GET) instead of --input")  # fmt: skip
        g.add_argument("--to-pacs", action="store_true", help="store the DICOM result (SR/SEG) into the PACS (C-STORE)")


def pacs_config(args: argparse.Namespace) -> Any:
    from privmed.pacs.config import PacsConfig, load_pacs_config, parse_address

    if args.dicomweb:
        from privmed.pacs.dicomweb import DicomwebConfig

        if args.pacs or args.pacs_config:
            raise InputError("give either --dicomweb or --pacs/--pacs-config, not both")
        return DicomwebConfig(args.dicomweb, timeout_s=args.pacs_timeout)
    if args.pacs_config is not None:
        if args.pacs:
            raise InputError("give either --pacs or --pacs-config, not both")
        return load_pacs_config(args.pacs_config)
    if not args.pacs:
        raise InputError("which PACS? give --pacs HOST:PORT (and --pacs-aet) or --pacs-config FILE.toml")
    host, port = parse_address(args.pacs)
    return PacsConfig(host, port, aet=args.pacs_aet, calling_aet=args.aet, timeout_s=args.pacs_timeout)


def service(cfg: Any) -> Any:
    """The module that talks to this PACS: ``privmed.pacs.dimse`` or ``privmed.pacs.dicomweb``
    (both have ``echo``, ``find``, ``get`` and ``store`` with the same arguments)."""
    from privmed.pacs import dicomweb, dimse

    return dicomweb if isinstance(cfg, dicomweb.DicomwebConfig) else dimse


def quiet_pynetdicom(args: argparse.Namespace) -> None:
    """pynetdicom logs every failure itself; our one-line PeerError says it already."""
    if not getattr(args, "verbose", False):
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def split_target(text: str) -> tuple[str, str | None]:
    study, _, series = text.partition("/")
    from privmed.pacs.dimse import UID_RE

    for uid in (study, series) if series else (study,):
        if not UID_RE.match(uid):
            raise InputError(f"--from-pacs {text!r}: expected STUDY_UID or STUDY_UID/SERIES_UID (digits and dots)")
    return study, series or None


@contextlib.contextmanager
def job_input(args: argparse.Namespace, need_one_series: bool) -> Iterator[Any]:
    """What a job reads: ``args.input`` as given, or a folder retrieved from the PACS.

    Yields ``args.input``'s value (a path or a list of paths, as the command declares it).
    A retrieved study with several image series is narrowed by ``--series`` where the
    command has it (segment) or refused by the reader, naming the series.
    """
    if getattr(args, "to_pacs", False) or args.from_pacs:
        quiet_pynetdicom(args)
    if args.from_pacs is None:
        if args.input is None:
            raise InputError("give --input or --from-pacs STUDY_UID[/SERIES_UID]")
        yield args.input
        return
    if args.input is not None:
        raise InputError("give either --input or --from-pacs, not both")
    cfg = pacs_config(args)
    study, series = split_target(args.from_pacs)
    with tempfile.TemporaryDirectory(prefix="privmed-pacs-") as tmp:
        t0 = time.perf_counter()
        files = service(cfg).get(cfg, Path(tmp), study, series)
        size = sum(f.stat().st_size for f in files)
        print(f"retrieved {len(files)} object{'s' if len(files) != 1 else ''} ({size / 1e6:.1f} MB) from PACS {cfg.name} "
              f"by {service(cfg).VERBS['get']} in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)  # fmt: skip
        # one sub-folder per series; the series reader looks into sub-folders and picks by --series
        args.source_label = f"{'series ' + series if series else 'study ' + study} from PACS {cfg.name}"
        try:
            yield Path(tmp) if need_one_series else [Path(tmp)]
        except InputError as exc:  # name what the user asked for, not our temporary folder
            text = str(exc)
            if not text.startswith(tmp):
                raise
            raise InputError(args.source_label + re.sub(re.escape(tmp) + r"/[^:;,]*", "", text[len(tmp):])) from None


def store_result(args: argparse.Namespace, files: list[Path]) -> None:
    """C-STORE the DICOM results if ``--to-pacs``; prints one line."""
    if not args.to_pacs:
        return
    cfg = pacs_config(args)
    t0 = time.perf_counter()
    n = service(cfg).store(cfg, files)
    print(f"stored {n} object{'s' if n != 1 else ''} into PACS {cfg.name} by {service(cfg).VERBS['store']} in "
          f"{time.perf_counter() - t0:.1f} s")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pacs", help="query, retrieve and store DICOM objects on a PACS (C-ECHO/FIND/GET/STORE)")
    psub = p.add_subparsers(dest="pacs_cmd", required=True, metavar="{echo,find,get,store}")
    e = psub.add_parser("echo", help="C-ECHO: is the PACS there and does it accept us?")
    add_pacs_options(e)
    e.set_defaults(func=cmd_echo)
    f = psub.add_parser("find", help="C-FIND studies, series or images (no patient names are printed)")
    add_pacs_options(f)
    f.add_argument("--level", choices=("study", "series", "image"), default="study")
    f.add_argument("--study", metavar="UID", help="StudyInstanceUID to match")
    f.add_argument("--series", metavar="UID", help="SeriesInstanceUID to match")
    f.add_argument("--modality", help="Modality to match (series/image level), e.g. CT, SEG, SR")
    f.set_defaults(func=cmd_find)
    g = psub.add_parser("get", help="C-GET a study or one series into a folder (one sub-folder per series)")
    add_pacs_options(g)
    g.add_argument("--study", metavar="UID", required=True)
    g.add_argument("--series", metavar="UID")
    g.add_argument("--out", type=Path, required=True, help="destination folder")
    g.set_defaults(func=cmd_get)
    s = psub.add_parser("store", help="C-STORE DICOM files (e.g. privmed's SEG/SR) into the PACS")
    add_pacs_options(s)
    s.add_argument("files", type=Path, nargs="+", help="DICOM files or folders of them")
    s.set_defaults(func=cmd_store)


def cmd_echo(args: argparse.Namespace) -> int:
    import pynetdicom  # noqa: F401 - imported before the clock starts (about 1 s on a busy machine)

    quiet_pynetdicom(args)
    cfg = pacs_config(args)
    t0 = time.perf_counter()
    service(cfg).echo(cfg)
    how = service(cfg).VERBS["echo"] + (f" from {cfg.calling_aet}" if hasattr(cfg, "calling_aet") else "")
    print(f"PACS {cfg.name} answered {how} in {1000 * (time.perf_counter() - t0):.0f} ms")
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    from privmed.pacs.dimse import FIND_KEYS

    quiet_pynetdicom(args)
    cfg = pacs_config(args)
    keys = {k: v for k, v in (("StudyInstanceUID", args.study), ("SeriesInstanceUID", args.series)) if v}
    if args.modality:
        keys["ModalitiesInStudy" if args.level == "study" else "Modality"] = args.modality
    level = args.level.upper()
    matches = service(cfg).find(cfg, level, **keys)
    columns = list(FIND_KEYS[level])
    print("\t".join(columns))
    for m in matches:
        print("\t".join(m.get(c, "") for c in columns))
    print(f"{len(matches)} {args.level} match{'es' if len(matches) != 1 else ''} on PACS {cfg.name}", file=sys.stderr)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    quiet_pynetdicom(args)
    cfg = pacs_config(args)
    t0 = time.perf_counter()
    files = service(cfg).get(cfg, args.out, args.study, args.series)
    size = sum(f.stat().st_size for f in files)
    for folder in sorted({f.parent for f in files}):
        n = sum(1 for f in files if f.parent == folder)
        print(f"{folder}: {n} object{'s' if n != 1 else ''}")
    print(f"retrieved {len(files)} object{'s' if len(files) != 1 else ''} ({size / 1e6:.1f} MB) from PACS {cfg.name} in {time.perf_counter() - t0:.1f} s")
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    files: list[Path] = []
    for path in args.files:
        if path.is_dir():
            files.extend(sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".")))
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"{path}: no such file or folder")
    if not files:
        raise InputError(f"nothing to store in {', '.join(map(str, args.files))}")
    args.to_pacs = True
    quiet_pynetdicom(args)
    store_result(args, files)
    return 0
