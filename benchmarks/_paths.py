"""How result files record paths: relative to the repository when inside it, else the file or
folder name alone (a result file names the project's files, not the machine it ran on)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def shown(path: str | Path) -> str:
    """``path`` as a result file records it."""
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name


def shown_args(args: Iterable[str]) -> list[str]:
    """A command line with every absolute path argument ``shown``."""
    return [shown(a) if a.startswith("/") else a for a in args]
