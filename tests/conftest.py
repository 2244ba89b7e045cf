"""Settings for the whole test suite.

The data owner's pseudonym key (``privmed.data.pseudonym``) defaults to a file in the user's
home; tests use one key of their own per test run, in the temporary folder, so the suite
neither reads nor creates a key in the home of whoever runs it. Set at import, before any
test module copies ``os.environ`` for its subprocesses.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

os.environ.setdefault(
    "PRIVMED_PSEUDONYM_KEY", str(Path(tempfile.mkdtemp(prefix="privmed-tests-")) / "pseudonym.key")
)
