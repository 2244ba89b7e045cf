"""Exceptions shared by all layers.

Every error a user can cause (bad file, bad shape, missing peer) is a ``PrivmedError`` whose
message is one line that names the thing at fault and what was expected; the CLI prints it
without a traceback and exits non-zero.
"""

from __future__ import annotations


class PrivmedError(Exception):
    """Base class for errors that the CLI reports as one line without a traceback."""


class InputError(PrivmedError):
    """A user-supplied file or argument is missing, unreadable or of the wrong shape/type."""


class ModelError(PrivmedError):
    """An ONNX model cannot be loaded or compiled (unsupported ops, bad graph)."""


class ProtocolError(PrivmedError):
    """A peer sent something the protocol did not expect (header, shape, order)."""


class PeerError(PrivmedError):
    """A peer is unreachable, timed out or disconnected."""


class ConfigError(PrivmedError):
    """A session configuration file is missing or wrong."""
