"""py-libp2p's pubsub behind our admission: a closed run's gossip never reaches a stranger.

py-libp2p 0.8.1's ``Pubsub`` serves every connected peer: it opens its own stream to anyone that
connects and reads whatever the peer's pubsub stream carries (SUBSCRIBE, GRAFT, IHAVE, IWANT).
Our hello, which checks the run secret, is a protocol beside it, so a stranger that never says
hello was subscribed, grafted into the mesh and handed every message of a closed run until its
hello grace ran out (measured: 8 of 8 run-state envelopes), and could reconnect at once.

:class:`GatedPubsub` closes both directions at the only two places a peer enters pubsub:

* ``_handle_new_peer`` (our outbound stream, the router's ``add_peer``): without it nothing can
  be sent to the peer, as every send goes through ``pubsub.peers`` / ``peer_queues``;
* ``stream_handler`` (their inbound stream): not a byte of it is read, so its subscriptions and
  control messages never reach ``peer_topics`` or the router.

Both wait for the host's verdict (``wait_admitted``: the hello passed on a live connection) and
drop the peer if it never comes. The decision itself stays in the host. Each peer also gets at
most :data:`MAX_INBOUND_STREAMS_PER_PEER` inbound pubsub streams at once (an RPC may be up to
``max_inbound_rpc_size`` bytes, each stream's reader buffers one).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from libp2p.abc import INetStream
from libp2p.peer.id import ID
from libp2p.pubsub.pubsub import Pubsub

__all__ = ["GatedPubsub", "MAX_INBOUND_STREAMS_PER_PEER"]

log = logging.getLogger(__name__)

MAX_INBOUND_STREAMS_PER_PEER = 2
"""A peer needs one; two leave room for a stream of a connection that is still closing."""


class GatedPubsub(Pubsub):
    """``Pubsub`` that exchanges nothing with a peer before ``admitted(peer_id)`` says yes.

    Args:
        host, router: as for ``Pubsub``.
        admitted: awaited with a peer id; True once the peer passed admission, False when it
            did not (in time, or its connection went). None: every peer is served (open run).
        **options: the remaining ``Pubsub`` arguments.
    """

    def __init__(self, host: Any, router: Any, *, admitted: Callable[[str], Awaitable[bool]] | None,
                 **options: Any) -> None:
        self._admitted = admitted
        self._inbound: dict[str, int] = {}
        super().__init__(host, router, **options)

    async def stream_handler(self, stream: INetStream) -> None:
        """Their pubsub stream: read only once the peer is admitted; reset it otherwise."""
        peer = str(stream.muxed_conn.peer_id)
        if self._inbound.get(peer, 0) >= MAX_INBOUND_STREAMS_PER_PEER:
            log.info("refused a pubsub stream from %s: %d already open", peer, MAX_INBOUND_STREAMS_PER_PEER)
            await _reset(stream)
            return
        self._inbound[peer] = self._inbound.get(peer, 0) + 1
        try:
            if self._admitted is not None and not await self._admitted(peer):
                log.info("refused the pubsub stream of %s: not admitted to this closed run", peer)
                await _reset(stream)
                return
            await super().stream_handler(stream)
        finally:
            left = self._inbound.pop(peer) - 1
            if left:
                self._inbound[peer] = left

    async def _handle_new_peer(self, peer_id: ID) -> None:
        """Our side: open the stream and add the peer to the router only once it is admitted."""
        if self._admitted is not None and not await self._admitted(str(peer_id)):
            log.debug("not adding %s to pubsub: not admitted", peer_id)
            return
        await super()._handle_new_peer(peer_id)


async def _reset(stream: INetStream) -> None:
    with contextlib.suppress(Exception):  # already gone is as good
        await stream.reset()
