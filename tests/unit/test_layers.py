"""The secure core's layers: no module imports a layer above its own (src/privmed/README.md)."""

from __future__ import annotations

import re
from pathlib import Path

ORDER = ["ring", "crypto", "net", "ir", "mpc", "reference", "compiler", "runtime", "engines"]
ROOT = Path(__file__).resolve().parents[2] / "src" / "privmed"


def test_no_import_goes_up_the_layer_list() -> None:
    upward = []
    for layer in ORDER:
        base = ROOT / layer
        files = [base.with_suffix(".py")] if base.with_suffix(".py").is_file() else sorted(base.rglob("*.py"))
        assert files, layer
        for path in files:
            for target in re.findall(r"^\s*(?:from|import) privmed\.(\w+)", path.read_text(), re.M):
                if target != "errors" and (target not in ORDER or ORDER.index(target) > ORDER.index(layer)):
                    upward.append(f"{path.relative_to(ROOT)} imports privmed.{target}")
    assert upward == []
