"""Tools for testing code that talks to hyphae hosts (shipped, as ``trio.testing`` is).

* :func:`wait_for` polls a condition with a deadline and a message that says what never happened.
* :class:`RawPeer` is a bare py-libp2p host in its own trio thread with whatever security
  transports a test chooses, able to send arbitrary bytes on any protocol or to listen on a
  gossipsub topic: the adversary in tests of refusal, eavesdropping and malformed input.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.custom_types import TProtocol
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service

from ._bridge import TrioThread
from ._trio_host import _build_libp2p_host
from .config import HostConfig
from .identity import Identity

__all__ = ["wait_for", "RawPeer"]


async def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str | Callable[[], str],
                   interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; raise AssertionError naming ``what``
    (a string, or a function giving one, to report the state at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what() if callable(what) else what}")
        await asyncio.sleep(interval_s)


class RawPeer:
    """A bare libp2p host for adversarial tests. Use as ``async with RawPeer(...) as peer``.

    Args:
        security: ``"noise"`` (as hyphae) or ``"plaintext"`` (only ``/plaintext/2.0.0``).
    """

    def __init__(self, security: str = "noise") -> None:
        self.identity = Identity.generate()
        self.security = security
        self._thread = TrioThread(name="raw-peer")
        self._cancel = trio.CancelScope()
        self._services: list[trio.CancelScope] = []
        self.host: Any = None

    def _build(self) -> Any:
        listen = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]
        if self.security == "noise":
            return _build_libp2p_host(self.identity, HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False), listen)
        keypair = self.identity.libp2p_keypair()
        return new_host(key_pair=keypair, listen_addrs=listen, muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
                        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(keypair)})

    async def __aenter__(self) -> RawPeer:
        self._thread.start()
        self.host = self._build()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with self._cancel:
                async with self.host.run([multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                    task_status.started()
                    await trio.sleep_forever()

        async def start() -> None:
            await self._thread.start_service(run)

        await self._thread.run(start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for scope in (*self._services, self._cancel):
            self._thread.run_sync_soon(scope.cancel)
        await asyncio.to_thread(self._thread.stop, 3.0)

    async def connect(self, addr: str) -> None:
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        await self._thread.run(self.host.connect, info)

    async def send_raw(self, addr: str, protocol: str, payload: bytes, *, read_timeout_s: float = 5.0) -> bytes:
        """Open ``protocol`` to the peer at ``addr``, write ``payload``, return what comes back
        until the remote closes or resets the stream (b"" if it sent nothing)."""
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))

        async def exchange() -> bytes:
            await self.host.connect(info)
            stream = await self.host.new_stream(info.peer_id, [TProtocol(protocol)])
            await stream.write(payload)
            received = b""
            with trio.move_on_after(read_timeout_s):
                while True:
                    try:
                        chunk = await stream.read(65536)
                    except Exception:  # noqa: BLE001 — reset/EOF both mean "the remote ended it"
                        break
                    if not chunk:
                        break
                    received += chunk
            return received

        return await self._thread.run(exchange)

    async def listen_gossip(self, topic: str) -> list[bytes]:
        """Run py-libp2p's own gossipsub on this host (no hello, no secret) subscribed to
        ``topic``; returns the list the data of every message it receives is appended to.
        Call before connecting, as pubsub learns of peers from connection events."""
        received: list[bytes] = []

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            gossip = GossipSub(protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11], degree=6, degree_low=4,
                               degree_high=12, heartbeat_interval=1, heartbeat_initial_delay=0.1)
            pubsub = Pubsub(self.host, gossip)
            scope = trio.CancelScope()
            self._services.append(scope)
            with scope:
                async with background_trio_service(pubsub), background_trio_service(gossip):
                    await pubsub.wait_until_ready()
                    subscription = await pubsub.subscribe(topic)
                    task_status.started()
                    async for message in subscription:
                        received.append(bytes(message.data))

        async def start() -> None:
            await self._thread.start_service(run)

        await self._thread.run(start)
        return received
