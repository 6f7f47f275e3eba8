"""The asyncio face of the control plane: one :class:`Host` per daemon.

The libp2p host runs in its own trio thread (:mod:`._bridge`, :mod:`._trio_host`); every method
here crosses into that thread once. Handlers the daemon registers are asyncio coroutines; the
framing, size limits and decoding happen on the trio side before a handler ever sees a message,
and a handler that raises :class:`ProtocolViolation` gets its stream reset with a logged reason
while the host keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from libp2p.abc import INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ._bridge import TrioThread
from .admission import Admission
from ._trio_host import TrioHost, live_connections
from .config import HostConfig
from .errors import ClosedError, EndOfStream, PeerError, ProtocolViolation
from .identity import Identity
from .peerbook import PeerBook
from .stream import MessageStream, TrioFramedStream
from .wire import DEFAULT_MAX_FRAME_BYTES

__all__ = ["Host", "PeerSnapshot", "open_host", "StreamHandler", "RequestHandler"]

log = logging.getLogger(__name__)

StreamHandler = Callable[[MessageStream], Awaitable[None]]
RequestHandler = Callable[[str, Any], Awaitable[Any]]
EventListener = Callable[[str, str], None]


@dataclass(frozen=True)
class PeerSnapshot:
    """One connected peer as the API shows it."""

    peer_id: str
    addrs: list[str]
    connection: str  # "direct" | "relayed"
    direction: str  # "inbound" | "outbound"
    rtt_ms: float | None
    connected_s: float
    agent: str | None
    roles: list[str]
    sources: list[str]
    bytes_out: int = 0
    """Control-plane bytes sent to the peer over its current connections (yamux frames)."""
    bytes_in: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


class Host:
    """A running libp2p host, used from asyncio. Build it with :func:`open_host`."""

    def __init__(self, identity: Identity, config: HostConfig, *, agent: str, roles: tuple[str, ...] = (),
                 peerbook_path: Path | None = None, admission: Admission | None = None) -> None:
        self.identity = identity
        self.config = config
        self.peer_id = identity.peer_id
        self._bridge = TrioThread(name=f"libp2p-{self.peer_id[-6:]}")
        peerbook = PeerBook.load(peerbook_path) if peerbook_path else PeerBook()
        self._trio = TrioHost(identity, config, agent=agent, roles=roles, peerbook=peerbook,
                              peerbook_path=peerbook_path, on_event=self._from_trio_event, admission=admission)
        self._cancel_run: trio.CancelScope | None = None
        self._run_done: trio.Event | None = None
        self._listeners: list[EventListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.addrs: list[str] = []

    # ---- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the libp2p thread, listen, and return once the host accepts connections."""
        self._loop = asyncio.get_running_loop()
        self._bridge.start(self._loop)
        try:
            self.addrs = await self._bridge.run(self._start_in_trio)
        except BaseException:
            await asyncio.to_thread(self._bridge.stop)
            raise
        log.info("libp2p host %s listening on %s", self.peer_id, ", ".join(self.addrs))

    async def _start_in_trio(self) -> list[str]:
        self._cancel_run = trio.CancelScope()
        self._run_done = trio.Event()

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with self._cancel_run:
                    await self._trio.run(task_status=task_status)
            finally:
                self._run_done.set()

        return await self._bridge.start_service(run)

    async def aclose(self, timeout_s: float = 4.0) -> None:
        """Close every connection, save the peer book, stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(ClosedError):
            await self._bridge.run(self._stop_in_trio, timeout_s)
        await asyncio.to_thread(self._bridge.stop, 1.0)

    async def _stop_in_trio(self, timeout_s: float) -> None:
        if self._cancel_run is None:
            return
        self._cancel_run.cancel()
        with trio.move_on_after(timeout_s):
            await self._run_done.wait()

    async def __aenter__(self) -> Host:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- events ----------------------------------------------------------------------------

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(kind, peer_id)`` in the asyncio loop when a hyphae peer is
        ``"connected"`` (hello passed) or ``"disconnected"``."""
        self._listeners.append(listener)

    def remove_listener(self, listener: EventListener) -> None:
        """Stop calling ``listener`` (no error if it was not registered)."""
        if listener in self._listeners:
            self._listeners.remove(listener)

    def _from_trio_event(self, kind: str, peer_id: str) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, kind, peer_id)

    def _dispatch(self, kind: str, peer_id: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(kind, peer_id)
            except Exception:  # noqa: BLE001 — one bad listener must not starve the others
                log.exception("peer event listener failed")

    # ---- peers -----------------------------------------------------------------------------

    async def connect(self, addr: str) -> str:
        """Dial ``addr`` (a multiaddr ending in /p2p/<peer id>) and return the peer id."""
        return await self._bridge.run(self._trio.connect, addr)

    async def disconnect(self, peer_id: str) -> None:
        await self._bridge.run(self._trio.disconnect, peer_id)

    async def peers(self) -> list[PeerSnapshot]:
        return await self._bridge.run(self._snapshot)

    async def _snapshot(self) -> list[PeerSnapshot]:
        network = self._trio.host.get_network()
        now = time.time()
        out: list[PeerSnapshot] = []
        for peer_id, state in sorted(self._trio.peers.items()):
            conns = live_connections(network, peer_id)
            remote = [str(a) for c in conns for a in c.get_transport_addresses()]
            hello = state.hello
            # Direct as soon as any connection is: after hole punching the relayed one lingers
            # for a grace period while new streams already take the direct one.
            direct = any(not any("/p2p-circuit" in str(a) for a in c.get_transport_addresses()) for c in conns)
            out.append(PeerSnapshot(
                peer_id=peer_id,
                addrs=list(hello.listen) if hello else remote,
                connection="direct" if direct or not conns else "relayed",
                direction=state.direction,
                rtt_ms=None if state.rtt_ms is None else round(state.rtt_ms, 3),
                connected_s=round(now - state.connected_at, 1),
                agent=hello.agent if hello else None,
                roles=list(hello.roles) if hello else [],
                sources=sorted(state.sources),
                bytes_out=sum(getattr(c.muxed_conn, "bytes_sent", 0) for c in conns),
                bytes_in=sum(getattr(c.muxed_conn, "bytes_received", 0) for c in conns),
            ))
        return out

    # ---- protocols -------------------------------------------------------------------------

    def set_stream_handler(self, protocol: str, handler: StreamHandler, *,
                           max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        """Serve ``protocol``: each inbound stream runs ``handler(stream)`` as an asyncio task."""

        async def on_stream(raw: INetStream) -> None:
            framed = TrioFramedStream(raw, max_frame_bytes=max_frame_bytes)
            await self._guard(framed, self._bridge.call_asyncio(handler, MessageStream(framed, self._bridge)))

        self._register(protocol, on_stream)

    def serve(self, protocol: str, handler: RequestHandler, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        """Serve request/response ``protocol``: ``reply = await handler(peer_id, request)``.

        Frames are read and checked in the libp2p thread; only whole, decoded requests cross to
        asyncio (one crossing each way per request). A stream carries any number of requests.
        """

        async def on_stream(raw: INetStream) -> None:
            framed = TrioFramedStream(raw, max_frame_bytes=max_frame_bytes)

            async def loop() -> None:
                while True:
                    request = await framed.recv()
                    await framed.send(await self._bridge.call_asyncio(handler, framed.peer_id, request))

            await self._guard(framed, loop())

        self._register(protocol, on_stream)

    async def _guard(self, framed: TrioFramedStream, work: Awaitable[None]) -> None:
        """Run a stream's work; on a violation reset the stream and log why, never crash."""
        clean = False
        try:
            await work
            clean = True
        except EndOfStream:
            clean = True
        except ProtocolViolation as exc:
            log.warning("closing %s stream from %s: %s", framed.protocol, framed.peer_id, exc)
        except PeerError as exc:
            log.debug("%s stream from %s ended: %s", framed.protocol, framed.peer_id, exc)
        except ClosedError:
            pass  # the daemon is shutting down
        except Exception:  # noqa: BLE001 — a handler bug must not take the host down
            log.exception("%s handler failed on a stream from %s", framed.protocol, framed.peer_id)
        finally:
            if clean:
                await framed.close()
            else:
                await framed.reset()

    def _register(self, protocol: str, on_stream: Callable[[INetStream], Awaitable[None]]) -> None:
        trio_host = self._trio

        async def members_only(raw: INetStream) -> None:
            # In a closed run only admitted peers are served: a stranger's stream is reset
            # before a byte of it is read (it is disconnected anyway once its hello fails).
            peer = str(raw.muxed_conn.peer_id)
            if trio_host.closed and not await trio_host.wait_admitted(peer):
                log.info("refused %s stream from %s: not admitted to this closed run", protocol, peer)
                with contextlib.suppress(Exception):
                    await raw.reset()
                return
            await on_stream(raw)

        def install() -> None:
            self._trio.host.set_stream_handler(TProtocol(protocol), members_only)

        if self._trio.host is None:
            raise ClosedError("register protocol handlers after start()")
        self._bridge.run_sync_soon(install)

    async def open_stream(self, peer_id: str, protocol: str, *,
                          max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> MessageStream:
        framed = await self._bridge.run(self._trio.open_framed, peer_id, protocol, max_frame_bytes)
        return MessageStream(framed, self._bridge)

    async def request(self, peer_id: str, protocol: str, message: Any, *,
                      max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Any:
        """Send one request to ``peer_id`` and return its reply (streams are pooled and reused).

        Use ``asyncio.timeout`` at the call site for a deadline; a cancelled request's stream is
        reset, never reused.
        """
        return await self._bridge.run(self._trio.request, peer_id, protocol, message, max_frame_bytes)

    # ---- pubsub ----------------------------------------------------------------------------

    async def subscribe(self, topic: str, handler: Callable[[str, bytes], None], *,
                        validator: Callable[[str, bytes], bool] | None = None) -> None:
        """Receive messages published on ``topic`` by other peers.

        ``handler(author_peer_id, data)`` is called in the asyncio loop. Gossipsub checks each
        message's signature against its author; the payload itself is untrusted bytes. Delivery
        is best-effort (messages can be lost); callers that need every message repair gaps
        themselves.

        ``validator(author, data) -> bool`` runs in the libp2p thread for every message before
        it is delivered or forwarded; a refused message goes no further. It must be fast and
        must only read state that tolerates being read from another thread.
        """

        def deliver(author: str, data: bytes) -> None:
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(_call_quietly, handler, author, data)

        await self._bridge.run(self._trio.subscribe, topic, deliver, validator)

    async def unsubscribe(self, topic: str) -> None:
        await self._bridge.run(self._trio.unsubscribe, topic)

    async def publish(self, topic: str, data: bytes) -> None:
        """Publish ``data`` (signed by this node) to everyone subscribed to ``topic``."""
        await self._bridge.run(self._trio.publish, topic, data)

    async def topic_peers(self, topic: str) -> list[str]:
        return await self._bridge.run(_sync_as_async(self._trio.topic_peers), topic)

    # ---- DHT -------------------------------------------------------------------------------

    async def dht_put(self, key: str, value: bytes) -> None:
        await self._bridge.run(self._trio.dht.put_value, key, value)

    async def dht_get(self, key: str) -> bytes | None:
        return await self._bridge.run(self._trio.dht_get, key)

    async def dht_provide(self, key: str) -> bool:
        return await self._bridge.run(self._trio.dht.provide, key)

    async def dht_find_providers(self, key: str, count: int = 20) -> list[str]:
        infos = await self._bridge.run(self._trio.dht.find_providers, key, count)
        return list(dict.fromkeys(str(i.peer_id) for i in infos))

    async def find_peer(self, peer_id: str) -> list[str] | None:
        """Look ``peer_id`` up in the DHT; its addresses, or None if nobody knows it."""
        info = await self._bridge.run(self._trio.dht.find_peer, ID.from_base58(peer_id))
        return None if info is None else [str(a) for a in info.addrs]

    # ---- NAT traversal ---------------------------------------------------------------------

    async def reachability(self) -> dict[str, Any]:
        """What this node knows about its own reachability (JSON-ready; protocol/nat/).

        Keys: ``state`` (``"public"`` | ``"private"`` | ``"unknown"``), ``confidence`` (servers
        agreeing), ``since`` and ``last_check`` (Unix times), ``last_check_s_ago``, ``observed``
        (addresses peers see us at), ``confirmed`` (addresses a dial-back reached on a fresh
        connection), ``relay_addrs`` (our ``/p2p-circuit`` addresses in use), ``relays`` (each
        reservation: relay, addresses, expiry, limits), ``mapped`` (UPnP port mappings),
        ``dht_mode``, ``relay_service`` (on/off, reservations, circuits, bytes relayed, refusals,
        limits), ``relay_client``, ``autonat_service``, ``upnp``, ``hole_punching`` (attempts,
        successes, failures, recent times to direct, per-peer state) and ``probes`` (the latest
        dial-back answer of each peer asked).
        """
        return await self._bridge.run(self._reachability_in_trio)

    async def _reachability_in_trio(self) -> dict[str, Any]:
        if self._trio.nat is None:
            return {"state": "unknown", "observed": [], "confirmed": [], "relay_addrs": [], "relays": [],
                    "mapped": [], "last_check": None}
        return self._trio.nat.snapshot()

    def routing_table_size(self) -> int:
        return self._trio.dht.get_routing_table_size() if self._trio.dht else 0

    @property
    def started_at(self) -> float:
        return self._trio.started_at


def _call_quietly(handler: Callable[[str, bytes], None], author: str, data: bytes) -> None:
    try:
        handler(author, data)
    except Exception:  # noqa: BLE001 — one bad message must not stop delivery of the next
        log.exception("pubsub handler failed on a message from %s", author)


def _sync_as_async(fn: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    async def call(*args: Any) -> Any:
        return fn(*args)

    return call


@contextlib.asynccontextmanager
async def open_host(identity: Identity, config: HostConfig, *, agent: str, roles: tuple[str, ...] = (),
                    peerbook_path: Path | None = None, admission: Admission | None = None) -> AsyncIterator[Host]:
    """Start a :class:`Host`, yield it once it listens, close it on exit. With a closed
    ``admission`` it talks only to peers admitted to the run (:mod:`.admission`)."""
    host = Host(identity, config, agent=agent, roles=roles, peerbook_path=peerbook_path, admission=admission)
    await host.start()
    try:
        yield host
    finally:
        await host.aclose()
