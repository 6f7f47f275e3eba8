"""The one error hierarchy for everything that crosses between machines.

Named by state, as trio does: ``ClosedError`` means *we* closed the thing, ``PeerError`` means the
other side failed or misbehaved, ``BusyError`` means two tasks tried to use one resource at once,
``ProtocolViolation`` means bytes arrived that break a protocol's rules (the stream is closed and
the reason logged). Messages give the value, the limit and the fix.
"""

from __future__ import annotations

__all__ = [
    "HyphaeError",
    "ClosedError",
    "PeerError",
    "BusyError",
    "EndOfStream",
    "ProtocolViolation",
    "MessageTooLarge",
    "ConfigError",
]


class HyphaeError(Exception):
    """Base of every error hyphae raises on purpose."""


class ClosedError(HyphaeError):
    """The host, stream or service was closed by this side; the call cannot proceed."""


class PeerError(HyphaeError):
    """A remote peer could not be reached, went away, or refused what we asked."""


class EndOfStream(PeerError):
    """The peer closed its side of a stream cleanly, at a frame boundary."""


class BusyError(HyphaeError):
    """Two tasks tried to use a resource that allows only one at a time."""


class NotAdmitted(PeerError):
    """A peer's hello was refused: it is on another network, or not a member of this closed run."""


class ProtocolViolation(PeerError):
    """A peer sent bytes that break the protocol (bad framing, schema, or size)."""


class MessageTooLarge(ProtocolViolation):
    """A length prefix announced more bytes than the protocol allows; nothing was allocated."""


class ConfigError(HyphaeError, ValueError):
    """A configuration value is invalid; the message says which one and how to fix it."""
