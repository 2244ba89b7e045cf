"""`privmed` command: parses arguments and dispatches to one module per subcommand.

Each module in ``privmed.cli`` named in ``SUBCOMMANDS`` defines ``register(subparsers)``,
which adds its parser and sets ``func(args) -> int``. Heavy imports (torch, MONAI, Flower)
happen inside ``func`` so that ``privmed --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from privmed.errors import PrivmedError

# module name in privmed.cli -> subcommands it registers
SUBCOMMANDS = [
    "infer",  # privmed infer, privmed party, privmed certs
    "demo",  # privmed demo
    "data",  # privmed data synth / inspect
    "train",  # privmed train
    "validate",  # privmed validate, privmed report
    "segment",  # privmed segment
    "federate",  # privmed federate
    "attack",  # privmed attack
    "pacs",  # privmed pacs echo / find / get / store
    "serve",  # privmed serve model-owner / dealer (long-running services)
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privmed",
        description="Secure medical-imaging AI: inference, validation, segmentation, federated training.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"privmed.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"privmed.cli.{name}":
                continue  # subcommand not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PrivmedError as exc:
        print(f"privmed: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("privmed: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
