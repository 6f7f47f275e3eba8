"""Request/response on the tensor plane: what a received message is, routes, awaited replies.

A request is a transfer of kind REQUEST whose tag names a route; the handler's :class:`Reply`
goes back as a transfer of kind REPLY with the request's id. A handler that raises a
``HyphaeError`` answers an error (its message reaches the caller as :class:`RemoteError`);
any other exception is logged here and answered as "internal error".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import HyphaeError
from .codecs import Codec
from .errors import RemoteError
from .spec import Tensor

__all__ = ["Message", "Reply", "RouteHandler", "Requests"]

log = logging.getLogger(__name__)

_ERROR_KEY = "_error"


@dataclass(frozen=True)
class Message:
    """A received transfer: its tensors (in the sender's order) and the sender's ``meta``."""

    tensors: list[Tensor]
    meta: dict[str, Any]


@dataclass(frozen=True)
class Reply:
    """What a request handler answers: small ``meta`` plus optional tensors."""

    meta: dict[str, Any] = field(default_factory=dict)
    tensors: Sequence[Tensor] = ()
    codec: str | Codec = "raw"
    sent: Callable[[], None] | None = None
    """Called once the reply has been delivered or has failed (e.g. to free an upload slot)."""


RouteHandler = Callable[[str, dict[str, Any], list[Tensor]], Awaitable[Reply]]
"""``reply = await handler(peer_id, meta, tensors)``; raise a HyphaeError to answer an error."""


class Requests:
    """The routes this node serves and the replies it waits for."""

    def __init__(self) -> None:
        self._routes: dict[str, RouteHandler] = {}
        self._waiting: dict[tuple[str, int], asyncio.Future[Reply]] = {}
        self._ids = itertools.count(1)

    def serve(self, route: str, handler: RouteHandler) -> None:
        self._routes[route] = handler

    def serves(self, route: str) -> bool:
        return route in self._routes

    def awaits(self, peer: str, request_id: int) -> bool:
        return (peer, request_id) in self._waiting

    @contextlib.contextmanager
    def expect(self, peer: str) -> Iterator[tuple[int, asyncio.Future[Reply]]]:
        """A fresh request id and the future its reply will complete (forgotten on exit)."""
        key = (peer, next(self._ids))
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._waiting[key] = fut
        try:
            yield key[1], fut
        finally:
            self._waiting.pop(key, None)

    def resolve(self, peer: str, request_id: int, reply: Reply) -> bool:
        """Complete a waiting request; False for a late or unknown reply."""
        fut = self._waiting.get((peer, request_id))
        if fut is None or fut.done():
            return False
        fut.set_result(reply)
        return True

    def fail(self, peer: str | None, exc: Exception) -> None:
        """Fail the requests waiting on ``peer`` (on everyone when None)."""
        for (who, _), fut in list(self._waiting.items()):
            if (peer is None or who == peer) and not fut.done():
                fut.set_exception(exc)

    async def handle(self, peer: str, route: str, meta: dict[str, Any], tensors: list[Tensor]) -> Reply:
        """Run the route's handler; errors become error replies."""
        try:
            return await self._routes[route](peer, meta, tensors)
        except HyphaeError as exc:
            return Reply({_ERROR_KEY: str(exc)[:1000]})
        except Exception:  # noqa: BLE001 — a handler bug answers an error, and is logged
            log.exception("handler of %s failed on a request from %s", route, peer)
            return Reply({_ERROR_KEY: "internal error"})

    @staticmethod
    def check(reply: Reply, peer: str, route: str) -> Reply:
        """Raise :class:`RemoteError` for an error reply."""
        if _ERROR_KEY in reply.meta:
            raise RemoteError(f"{peer} answered {route!r}: {reply.meta[_ERROR_KEY]}")
        return reply
