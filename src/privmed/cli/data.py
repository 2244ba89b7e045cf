"""`privmed data synth chest|ct`, `privmed data inspect`, `privmed data deid`, `privmed data pseudonym`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, TextIO


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="synthetic multi-site studies; inspect a dataset folder")
    dsub = p.add_subparsers(dest="data_cmd", required=True, metavar="{synth,inspect,deid,pseudonym}")

    s = dsub.add_parser("synth", help="write a synthetic multi-site study in real formats")
    kind = s.add_subparsers(dest="kind", required=True, metavar="{chest,ct}")
    c = kind.add_parser(
        "chest", help="chest radiographs (PNG or DICOM) + ChestX-ray14-style labels.csv"
    )
    c.add_argument("--out", required=True, type=Path, help="output folder")
    c.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    c.add_argument("--n", type=int, default=100, help="images per site (default 100)")
    c.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    c.add_argument("--format", choices=["png", "dicom"], default="png", help="default png")
    c.add_argument("--seed", type=int, default=0, help="default 0; same seed -> same bytes")
    c.set_defaults(func=cmd_synth_chest)
    t = kind.add_parser("ct", help="CT volumes + lung/lesion masks as NIfTI (MSD layout)")
    t.add_argument("--out", required=True, type=Path, help="output folder")
    t.add_argument("--sites", type=int, default=2, help="number of sites, 1-3 (default 2)")
    t.add_argument("--n", type=int, default=8, help="number of volumes (default 8)")
    t.add_argument("--size", type=int, default=64, help="volume side in voxels (default 64)")
    t.add_argument("--seed", type=int, default=0, help="default 0")
    t.set_defaults(func=cmd_synth_ct)

    i = dsub.add_parser(
        "inspect", help="print the layout, findings, per-site counts and skipped files"
    )
    i.add_argument("path", type=Path, help="study folder, label .csv or MedMNIST .npz")
    i.add_argument(
        "--uncertain",
        choices=["zeros", "ones", "ignore"],
        default="zeros",
        help="CheXpert uncertain (-1) labels: 0, 1 or unknown (default zeros)",
    )
    i.add_argument(
        "--blank",
        choices=["zeros", "nan"],
        default="zeros",
        help="CheXpert blank labels (default zeros)",
    )
    i.add_argument("--no-verify", action="store_true", help="do not decode every image")
    i.set_defaults(func=cmd_inspect)

    d = dsub.add_parser("deid", help="de-identified copy of a DICOM folder (PS3.15 basic profile, dicognito)")
    d.add_argument("src", type=Path, help="folder of DICOM files (read recursively)")
    d.add_argument("--out", required=True, type=Path, help="output folder (outside SRC); files named by new UIDs")
    d.add_argument("--key", type=Path, help="the data owner's pseudonym key (default ~/.config/privmed/pseudonym.key)")
    d.set_defaults(func=cmd_deid)
    n = dsub.add_parser("pseudonym", help="the pseudonym privmed writes for each image (for the data owner only)")
    n.add_argument("paths", type=Path, nargs="+", help="image files, or a study folder (its images)")
    n.add_argument("--key", type=Path, help="the data owner's pseudonym key (default ~/.config/privmed/pseudonym.key)")
    n.set_defaults(func=cmd_pseudonym)


class CountProgress:
    """``label: done/total`` on one updating line on a terminal, every 10 % otherwise."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr  # looked up now, not at import
        self.label, self.tty = label, self.stream.isatty()
        self.start = time.perf_counter()
        self._last = -1

    def __call__(self, done: int, total: int) -> None:
        pct = 100 * done // max(total, 1)
        if self.tty:
            bar = "#" * (pct // 5)
            self.stream.write(f"\r\033[K{self.label}: [{bar:<20}] {done}/{total}")
            if done == total:
                self.stream.write("\n")
        elif pct // 10 != self._last:
            self._last = pct // 10
            self.stream.write(f"{self.label}: {done}/{total} ({pct}%)\n")
        self.stream.flush()


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cmd_synth_chest(args: argparse.Namespace) -> int:
    from privmed.cli.progress import human_bytes
    from privmed.data.synth import synth_chest_study

    progress = CountProgress(f"writing {args.format} images")
    out = synth_chest_study(
        args.out, sites=args.sites, n_per_site=args.n, size=args.size, fmt=args.format,
        seed=args.seed, progress=progress,
    )  # fmt: skip
    wall = time.perf_counter() - progress.start
    print(
        f"wrote {args.sites * args.n} chest images ({args.sites} sites x {args.n}, "
        f"{args.size}x{args.size} {args.format}) and labels.csv to {out} "
        f"in {wall:.1f} s, {human_bytes(_folder_bytes(out))}"
    )
    print(f"inspect with: privmed data inspect {out}")
    return 0


def cmd_synth_ct(args: argparse.Namespace) -> int:
    from privmed.cli.progress import human_bytes
    from privmed.data.synth import synth_ct_study

    progress = CountProgress("writing CT volumes")
    shape = (args.size, args.size, args.size)
    out = synth_ct_study(
        args.out, n_volumes=args.n, shape=shape, seed=args.seed, sites=args.sites, progress=progress
    )
    wall = time.perf_counter() - progress.start
    print(
        f"wrote {args.n} CT volumes {shape} with lung/lesion masks (imagesTr/, labelsTr/, "
        f"dataset.json) to {out} in {wall:.1f} s, {human_bytes(_folder_bytes(out))}"
    )
    return 0


def describe_study(study: Any) -> str:
    """The text `privmed data inspect` prints (also used in docs/data.md)."""
    import numpy as np

    lines = [
        f"study   {study.root}",
        f"layout  {study.layout}",
        f"images  {len(study.records)} loaded, {len(study.skipped)} skipped",
        f"findings ({len(study.findings)}): {', '.join(study.findings) or '(none: unlabelled)'}",
    ]
    groups = study.by_site()
    if study.findings:
        width = max(12, *(len(f) + 1 for f in study.findings))
        head = f"{'site':<12} {'images':>6}  " + " ".join(
            f"{f[:width]:>{width}}" for f in study.findings
        )
        lines += ["", "prevalence (fraction positive among known labels; n/a = unknown)", head]
        rows = [*groups.items(), ("all", study.records)]
        for site, recs in rows:
            prev = study.prevalence(recs)
            cells = " ".join(
                f"{'n/a' if np.isnan(prev[f]) else f'{prev[f]:.2f}':>{width}}"
                for f in study.findings
            )
            lines.append(f"{site[:12]:<12} {len(recs):>6}  {cells}")
    else:
        lines += ["", f"{'site':<12} {'images':>6}"]
        lines += [f"{site[:12]:<12} {len(recs):>6}" for site, recs in groups.items()]
    if study.skipped:
        lines += ["", "skipped:"]
        lines += [f"  {path}: {reason}" for path, reason in study.skipped[:50]]
        if len(study.skipped) > 50:
            lines.append(f"  ... and {len(study.skipped) - 50} more")
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    from privmed.data.datasets import load_study

    study = load_study(
        args.path, uncertain=args.uncertain, blank=args.blank, verify=not args.no_verify
    )
    print(describe_study(study))
    return 0


def cmd_deid(args: argparse.Namespace) -> int:
    from privmed.data.deid import deidentify_folder
    from privmed.data.pseudonym import load_or_create_key

    t0 = time.perf_counter()
    summary = deidentify_folder(args.src, args.out, load_or_create_key(args.key))
    for path, why in summary.refused:
        print(f"refused {path}: {why}", file=sys.stderr)
    print(f"de-identified {len(summary.written)} DICOM files into {args.out} in {time.perf_counter() - t0:.1f} s "
          f"({len(summary.refused)} refused, {summary.not_dicom} non-DICOM files skipped)")  # fmt: skip
    return 0 if not summary.refused else 1


def cmd_pseudonym(args: argparse.Namespace) -> int:
    from privmed.data.pseudonym import Pseudonymizer, image_identity, load_or_create_key
    from privmed.data.readers import image_kind

    names = Pseudonymizer(load_or_create_key(args.key))
    for path in args.paths:
        root = path if path.is_dir() else None
        files = sorted(f for f in path.rglob("*") if f.is_file() and image_kind(f)) if root else [path]
        for f in files:
            print(f"{names.of(image_identity(f, root))}\t{f}")
    return 0
