"""Federated training across hospitals: Flower SecAgg+ and Opacus DP-SGD.

Modules in dependency order: see ``README.md`` in this folder. The names below are loaded
on first use, so that ``import privmed.federated`` imports neither torch nor Flower.

``client_update`` is what one site computes and sends in one round (see ``local``).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["DPSGD", "LocalTraining", "SiteUpdate", "client_update", "get_arrays", "set_arrays"]

_WHERE = {
    "DPSGD": "local",
    "LocalTraining": "local",
    "SiteUpdate": "local",
    "client_update": "local",
    "get_arrays": "arrays",
    "set_arrays": "arrays",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f"privmed.federated.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'privmed.federated' has no attribute {name!r}")
