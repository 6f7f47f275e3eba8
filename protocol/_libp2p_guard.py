"""Contain a failing libp2p stream handler to its own stream (py-libp2p 0.8.1 lets it kill the host).

In py-libp2p 0.8.1 an exception raised by *any* protocol handler on an inbound stream escapes
``BasicHost._swarm_stream_handler`` into the connection's nursery, then the swarm's, and ends
the whole libp2p host (measured: one undecodable RPC on ``/meshsub/1.1.0`` — gossipsub's
``ParseFromString`` raises ``DecodeError`` — crashed the trio thread of a hyphae host, so any
peer that can complete Noise could take a node off the network with a few bytes). The same
path is open to its Kad-DHT, identify and ping handlers, and to a failed protocol negotiation
(``StreamFailure``).

:func:`install` wraps that method once, process-wide: an ``Exception`` from a handler is logged,
the stream reset, and the remote peer reported (major) to the local node's score table;
cancellation (a ``BaseException``) passes through untouched. Our own handlers are already
guarded by :class:`~hyphae.protocol.host.Host`; this covers py-libp2p's.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from libp2p.host.basic_host import BasicHost

from .scoring import Severity, scores_for

__all__ = ["install", "installed"]

log = logging.getLogger(__name__)

_ORIGINAL = BasicHost._swarm_stream_handler
_installed = False


async def _guarded_stream_handler(self: BasicHost, net_stream: Any) -> None:
    try:
        await _ORIGINAL(self, net_stream)
    except Exception as exc:  # noqa: BLE001 — one stream's failure must not end the host
        try:
            peer = str(net_stream.muxed_conn.peer_id)
            protocol = str(net_stream.get_protocol() or "(not negotiated)")
        except Exception:  # noqa: BLE001 — a half-built stream: still contain it
            peer, protocol = "?", "?"
        log.warning("%s stream from %s failed and was reset (the host keeps serving): %s: %s",
                    protocol, peer, type(exc).__name__, str(exc)[:200])
        if peer != "?":
            with contextlib.suppress(Exception):
                scores_for(str(self.get_id())).report(peer, f"libp2p.{protocol.strip('/').split('/')[-2:][0]}",
                                                      Severity.MAJOR, f"{protocol}: {type(exc).__name__}")
        with contextlib.suppress(Exception):
            await net_stream.reset()


def install() -> None:
    """Wrap ``BasicHost._swarm_stream_handler`` (idempotent; affects hosts built afterwards)."""
    global _installed
    if not _installed:
        BasicHost._swarm_stream_handler = _guarded_stream_handler  # type: ignore[method-assign]
        _installed = True


def installed() -> bool:
    return _installed
