"""Errors of the tensor plane: subclasses of the one hierarchy in :mod:`hyphae.protocol.errors`."""

from __future__ import annotations

from ..errors import HyphaeError, PeerError, ProtocolViolation

__all__ = ["IntegrityError", "Refused", "NotSent", "RemoteError", "BlobNotFound", "BlobCorrupt", "BlobTooLarge"]


class IntegrityError(ProtocolViolation):
    """A sealed frame failed authentication: tampered, truncated, replayed, reordered, or sealed
    with other keys. The connection it came on is closed; nothing of its transfer is kept."""


class Refused(PeerError):
    """The receiver refused a transfer (over its limits, out of budget); its reason is the message."""


class NotSent(PeerError):
    """The connection failed before the transfer's END was written: the receiver cannot have
    kept it, so sending again (on another connection) is safe."""


class RemoteError(PeerError):
    """The peer's request handler failed; its reason is the message."""


class BlobNotFound(PeerError):
    """No reachable provider had the blob (or the chunk) asked for."""


class BlobCorrupt(PeerError):
    """Bytes did not match their content address (a provider sent wrong data, or a local file
    was damaged); they were not kept."""


class BlobTooLarge(HyphaeError):
    """A blob's manifest declares more bytes than this node's blob budget (sized from the model
    its run trains) allows; nothing of it was fetched. The message names the size, the limit
    and what it was sized from."""
