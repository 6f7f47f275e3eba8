"""Received transfers waiting for ``recv(peer, tag)``, under a byte budget per node and per peer.

A transfer that arrives while someone already waits for its (peer, tag) is *claimed* and costs
no budget. Otherwise its bytes count against ``max_unclaimed_bytes`` from its header on (so a
peer cannot fill memory with transfers nobody asked for) until it is claimed or expires, and
against its sender's own ``max_unclaimed_bytes_per_peer``: with one pool only, a single peer
could fill it and keep every other peer's early transfers refused for the whole TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from ..errors import BusyError

__all__ = ["Mailbox"]

log = logging.getLogger(__name__)

Key = tuple[str, str]


@dataclass
class _Item:
    value: Any
    nbytes: int
    at: float


class Mailbox:
    """Per (peer, tag) queues of received values and of waiting receivers."""

    def __init__(self, max_unclaimed_bytes: int, ttl_s: float, max_unclaimed_bytes_per_peer: int | None = None) -> None:
        self.max_unclaimed_bytes = max_unclaimed_bytes
        self.max_unclaimed_bytes_per_peer = (max_unclaimed_bytes if max_unclaimed_bytes_per_peer is None
                                             else max_unclaimed_bytes_per_peer)
        self.ttl_s = ttl_s
        self.unclaimed_bytes = 0
        self._by_peer: dict[str, int] = {}
        self._items: dict[Key, deque[_Item]] = {}
        self._waiters: dict[Key, deque[asyncio.Future[Any]]] = {}

    def _has_waiter(self, key: Key) -> bool:
        return any(not f.done() for f in self._waiters.get(key, ()))

    def reserve(self, peer: str, tag: str, nbytes: int) -> bool:
        """Account for an incoming transfer before it is allocated; True if it was counted.

        Raises:
            BusyError: nobody waits for it and it would exceed the unclaimed budget.
        """
        if self._has_waiter((peer, tag)):
            return False
        mine = self._by_peer.get(peer, 0)
        if mine + nbytes > self.max_unclaimed_bytes_per_peer:
            raise BusyError(
                f"{nbytes}-byte transfer {tag!r:.60} would raise this peer's unclaimed bytes to "
                f"{mine + nbytes}, limit {self.max_unclaimed_bytes_per_peer} per peer: the receiver must "
                "recv() sooner, or raise max_unclaimed_bytes_per_peer"
            )
        if self.unclaimed_bytes + nbytes > self.max_unclaimed_bytes:
            raise BusyError(
                f"{nbytes}-byte transfer {tag!r:.60} would raise unclaimed bytes to "
                f"{self.unclaimed_bytes + nbytes}, limit {self.max_unclaimed_bytes}: the receiver must recv() "
                "sooner, or raise max_unclaimed_bytes"
            )
        self._count(peer, nbytes)
        return True

    def unreserve(self, peer: str, nbytes: int, counted: bool) -> None:
        if counted:
            self._count(peer, -nbytes)

    def unclaimed_by(self, peer: str) -> int:
        """Bytes of ``peer``'s transfers waiting unclaimed (or reserved for ones arriving)."""
        return self._by_peer.get(peer, 0)

    def _count(self, peer: str, delta: int) -> None:
        self.unclaimed_bytes += delta
        left = self._by_peer.get(peer, 0) + delta
        if left:
            self._by_peer[peer] = left
        else:
            self._by_peer.pop(peer, None)  # no entry per peer that ever sent: bounded by who holds bytes

    def put(self, peer: str, tag: str, value: Any, nbytes: int, counted: bool) -> None:
        """Hand ``value`` to the first waiter, or keep it (counted) until claimed or expired."""
        key = (peer, tag)
        waiters = self._waiters.get(key)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(value)
                self.unreserve(peer, nbytes, counted)
                return
        if not counted:
            self._count(peer, nbytes)  # its waiter left: it is unclaimed now
        self._items.setdefault(key, deque()).append(_Item(value, nbytes, time.monotonic()))

    async def get(self, peer: str, tag: str) -> Any:
        """The next value for (peer, tag), waiting if none is there.

        Cancellation removes the wait; a value that arrives later stays in the box.
        """
        key = (peer, tag)
        items = self._items.get(key)
        if items:
            item = items.popleft()
            if not items:
                del self._items[key]
            self._count(peer, -item.nbytes)
            return item.value
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(key, deque()).append(fut)
        try:
            return await fut
        finally:
            waiters = self._waiters.get(key)
            if waiters is not None:
                if fut in waiters:
                    waiters.remove(fut)
                if not waiters:
                    del self._waiters[key]

    def holds(self, peer: str, tag: str) -> bool:
        """Whether a value for (peer, tag) is already here."""
        return bool(self._items.get((peer, tag)))

    def waiting_on(self, peer: str) -> bool:
        return any(k[0] == peer and self._has_waiter(k) for k in self._waiters)

    def fail(self, peer: str, exc: Exception) -> None:
        """Wake everyone waiting on ``peer`` with ``exc`` (the peer is gone)."""
        for key, waiters in list(self._waiters.items()):
            if key[0] == peer:
                for fut in waiters:
                    if not fut.done():
                        fut.set_exception(exc)

    def fail_all(self, exc: Exception) -> None:
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_exception(exc)

    def expire(self, now: float | None = None) -> int:
        """Drop values older than the TTL; return how many."""
        now = time.monotonic() if now is None else now
        dropped = 0
        for key in list(self._items):
            items = self._items[key]
            while items and now - items[0].at > self.ttl_s:
                item = items.popleft()
                self._count(key[0], -item.nbytes)
                dropped += 1
                log.info("dropping unclaimed transfer %r from %s after %.0f s", key[1], key[0], self.ttl_s)
            if not items:
                del self._items[key]
        return dropped

    def purge(self, prefix: str) -> int:
        """Drop every kept value whose tag starts with ``prefix`` (a finished operation's
        stragglers); return how many."""
        dropped = 0
        for key in [k for k in self._items if k[1].startswith(prefix)]:
            for item in self._items.pop(key):
                self._count(key[0], -item.nbytes)
                dropped += 1
        return dropped
