"""privmed: secure inference, validation, segmentation and federated training for medical imaging.

Importing privmed does nothing: no logging set-up, no argv parsing, no thread pools.
See ``src/privmed/README.md`` for the layers in dependency order.
"""

from __future__ import annotations

__version__ = "0.1.0"
