"""What one peer may ask of this node's tensor plane: data connections, request rate, requests in
flight; refusals and violations go to the local node's score table.

Kept apart from :mod:`.service` so the plane's transfer logic stays readable: the plane asks
:meth:`Guard.admit_request` before it allocates anything for a request, and releases the slot
once the handler's reply is made (or the transfer broke).
"""

from __future__ import annotations

from typing import Any

from ..errors import PeerError
from ..ratelimit import KeyedLimiter, KeyedSlots, RateLimit
from ..scoring import Severity, scores_for

__all__ = ["Guard", "REQUEST_RATE", "MAX_REQUESTS_PER_PEER", "MAX_REQUESTS"]

REQUEST_RATE = RateLimit(rate_per_s=100.0, burst=200.0)
"""Requests one peer may send (a blob fetch keeps <= 4 chunk requests in flight)."""
MAX_REQUESTS_PER_PEER = 32
MAX_REQUESTS = 256


class Guard:
    """Per-peer limits of one plane; reports refusals to the local node's score table.

    Args:
        local: the local node (its ``peer_id`` keys the score table).
    """

    def __init__(self, local: Any) -> None:
        self._local = local
        self._rate = KeyedLimiter(REQUEST_RATE)
        self._slots = KeyedSlots(per_key=MAX_REQUESTS_PER_PEER, total=MAX_REQUESTS)
        self._holding: set[int] = set()

    def report(self, peer: str, what: str, severity: Severity, detail: str) -> None:
        scores_for(self._local).report(peer, what, severity, detail)

    def admit_session(self, peer: str, held: int, limit: int) -> None:
        """Refuse another data connection from ``peer`` when it already ``held`` ``limit`` (each
        costs two frame-sized buffers here).

        Raises:
            PeerError: at the limit.
        """
        if held >= limit:
            self.report(peer, "tensor.sessions", Severity.MINOR, f"{held} data connections, limit {limit}")
            raise PeerError(f"{peer} holds {held} data connections (with pending ones), limit {limit}")

    def admit_request(self, peer: str, token: int) -> None:
        """Take a request slot for ``token`` (the transfer's identity) or refuse.

        Raises:
            PeerError: over the rate or the slots; the message says which.
        """
        if not self._rate.allow(peer):
            self.report(peer, "tensor.request_rate", Severity.MINOR, f"over {REQUEST_RATE.rate_per_s:g} requests/s")
            raise PeerError(f"more than {REQUEST_RATE.rate_per_s:g} requests/s; slow down")
        if not self._slots.acquire(peer):
            self.report(peer, "tensor.request_slots", Severity.MINOR, "too many requests in flight")
            raise PeerError(f"more than {MAX_REQUESTS_PER_PEER} requests of yours (or {MAX_REQUESTS} in all) "
                            f"are being answered; wait for the replies")
        self._holding.add(token)

    def release(self, peer: str, token: int) -> None:
        """Give back ``token``'s slot, if it holds one (idempotent)."""
        if token in self._holding:
            self._holding.discard(token)
            self._slots.release(peer)

    def in_flight(self, peer: str | None = None) -> int:
        return self._slots.held(peer)
