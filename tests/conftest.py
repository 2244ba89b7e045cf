"""Settings for the whole test suite.

The data owner's pseudonym key (``privmed.data.pseudonym``) defaults to a file in the user's
home; tests use one key of their own per test run, in the temporary folder, so the suite
neither reads nor creates a key in the home of whoever runs it. The model owner's plan cache
(``privmed.compiler.cache``) likewise lives in the run's temporary folder. Set at import,
before any test module copies ``os.environ`` for its subprocesses.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_RUN_DIR = Path(tempfile.mkdtemp(prefix="privmed-tests-"))
os.environ.setdefault("PRIVMED_PSEUDONYM_KEY", str(_RUN_DIR / "pseudonym.key"))
os.environ.setdefault("PRIVMED_CACHE_DIR", str(_RUN_DIR / "plans"))
