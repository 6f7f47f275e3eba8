"""The tensor plane of one daemon: data connections to peers, and tensors over them.

:class:`TensorPlane` owns a TCP data listener, the ``/hyphae/tensor/1`` handler on the host,
and a small pool of :class:`~.session.Session` per peer (one outgoing transfer per session at a
time; more sessions, up to ``max_sessions_per_peer``, for concurrent transfers). Which path a
session took (direct TCP, libp2p, libp2p-relayed; see :mod:`.connect`) does not change the API,
only :meth:`TensorPlane.stats`.

Transfers are tagged: ``send(peer, tag, ...)`` on one side meets ``recv(peer, tag)`` on the
other, in either order (an early arrival waits in a mailbox, within ``max_unclaimed_bytes``).
:meth:`TensorPlane.request`/:meth:`TensorPlane.serve` add request/response on top, which the
all-reduce and the blob service use.

Every background task (accept loops, session readers, request handlers, upkeep) lives in the
plane's TaskGroup, opened by :func:`open_tensor_plane`.

Untrusted peers: :mod:`._guard` caps each peer's data connections, request rate and requests in
flight, and scores refusals and protocol violations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import ClosedError, HyphaeError, PeerError, ProtocolViolation
from ..host import Host
from ..scoring import Severity
from ..stream import MessageStream
from . import connect
from ._bufpool import BufferPool
from ._guard import Guard
from ._listener import DataListener
from ._mailbox import Mailbox
from ._requests import Message, Reply, Requests, RouteHandler
from ._util import guarded, run_all, specs_of
from .allreduce import AllReduce, AllReduceResult
from .budget import TransferBudget
from .carrier import stream_frame_limit
from .codecs import Codec
from .config import TensorConfig
from .errors import NotSent
from .session import Session, Traffic
from .spec import Tensor
from .wire import KIND_MESSAGE, KIND_REPLY, KIND_REQUEST, MAX_TAG_CHARS, PROTOCOL_ID, Begin

__all__ = ["TensorPlane", "Message", "Reply", "RouteHandler", "open_tensor_plane"]

log = logging.getLogger(__name__)

ENCODE_IN_THREAD_BYTES = 1 << 20
GONE_POLL_S, GONE_POLLS = 0.2, 50


@dataclass
class _PeerStats:
    traffic: Traffic = field(default_factory=Traffic)
    path: str | None = None
    opened: dict[str, int] = field(default_factory=dict)
    transfers_sent: int = 0
    transfers_received: int = 0
    failures: int = 0
    last_error: str = ""


class TensorPlane:
    """Tensors to and from peers over authenticated, encrypted data connections.

    Build it with :func:`open_tensor_plane`. All methods are coroutines of the daemon's loop;
    deadlines are the caller's (``asyncio.timeout``), except where a ``timeout_s`` is taken.
    """

    def __init__(self, host: Host, config: TensorConfig, task_group: asyncio.TaskGroup, *,
                 puncher: connect.Puncher | None = None) -> None:
        self.host = host
        self.config = config
        self.peer_id = host.peer_id
        self._tg = task_group
        self._puncher = puncher
        self._limits = config.limits
        self._budget = TransferBudget.of(config)
        self._mailbox = Mailbox(config.max_unclaimed_bytes, config.mailbox_ttl_s, config.max_unclaimed_bytes_per_peer)
        self._buffers = BufferPool(config.recv_pool_bytes)
        self._sessions: dict[str, list[Session]] = {}
        self._reserved: set[Session] = set()
        self._dialing: dict[str, int] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._requests = Requests()
        self._admitted: dict[int, bool] = {}
        self._guard = Guard(host)
        self._stats: dict[str, _PeerStats] = {}
        self._gone: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener = DataListener(config, local_id=self.peer_id, on_link=self._run_inbound, spawn=self._spawn)
        self.data_addrs: tuple[str, ...] = ()
        self._closed = False

    # ---- lifecycle -------------------------------------------------------------------------

    async def _start(self) -> None:
        self._listener.start()
        self.data_addrs = self._listener.addrs
        self.host.set_stream_handler(PROTOCOL_ID, self._on_stream, max_frame_bytes=stream_frame_limit(self._limits))
        self.host.add_listener(self._on_peer_event)
        self._allreduce = AllReduce(self)
        self._spawn("tensor-upkeep", self._upkeep)
        log.info("tensor plane of %s listening on %s", self.peer_id, ", ".join(self.data_addrs) or "(nothing)")

    async def aclose(self) -> None:
        """Close every data connection and the listener; pending calls fail. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.host.remove_listener(self._on_peer_event)
        closed = ClosedError("the tensor plane is closed")
        self._mailbox.fail_all(closed)
        self._requests.fail(None, closed)
        for sessions in list(self._sessions.values()):
            for session in list(sessions):
                await session.aclose()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)  # accept loops first leave their sockets alone
        self._listener.close()

    def _spawn(self, name: str, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> asyncio.Task[Any] | None:
        """Run ``fn(*args)`` as a plane task (the coroutine is made inside the task, so a task
        cancelled before it starts leaves no un-awaited coroutine behind). None once closed."""
        if self._closed:
            return None
        task = self._tg.create_task(guarded(log, name, fn, *args), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("the tensor plane is closed")

    # ---- public API ------------------------------------------------------------------------

    async def send(self, peer_id: str, tag: str, tensors: Sequence[Tensor], *, codec: str | Codec = "raw",
                   meta: dict[str, Any] | None = None) -> None:
        """Send named tensors to ``peer_id``; returns once the peer verified and kept them.

        ``meta`` is optional small data (plain msgpack values, < 64 KiB with the specs) that
        :meth:`recv_message` returns alongside the tensors.

        Raises:
            ValueError: bad tensors or codec (duplicate names, sending to ourselves).
            Refused: the peer refused (limits, budget); the message says why.
            PeerError: no data connection could be made, or it broke.
            ClosedError: this plane is closed.

        Cancellation closes the data connection in use; the peer discards the partial transfer.
        """
        begin = Begin(tag, specs_of(tensors), Codec.named(codec), KIND_MESSAGE, 0, dict(meta or {}))
        await self._transfer(peer_id, begin, tensors)

    async def recv(self, peer_id: str, tag: str) -> list[Tensor]:
        """The tensors ``peer_id`` sends (or sent) with ``tag``, in the sender's order.

        Raises:
            PeerError: the peer went away (libp2p disconnected and no data connection left).
            ClosedError: this plane is closed.

        Cancelling leaves nothing behind; a transfer that arrives later waits in the mailbox.
        """
        return (await self.recv_message(peer_id, tag)).tensors

    async def recv_message(self, peer_id: str, tag: str) -> Message:
        """As :meth:`recv`, with the sender's ``meta``."""
        self._check_open()
        if peer_id in self._gone and not self._mailbox.holds(peer_id, tag):
            raise PeerError(f"{peer_id} is gone (disconnected, no data connection left)")
        return await self._mailbox.get(peer_id, tag)

    async def exchange(self, peer_id: str, tag: str, tensors: Sequence[Tensor], *,
                       codec: str | Codec = "raw") -> list[Tensor]:
        """Send ``tensors`` to ``peer_id`` and receive its tensors of the same ``tag``.

        Both sides call it (in any order, at once is fine: sends and receives run concurrently,
        on separate or shared connections, so it cannot deadlock). Raises as :meth:`send` and
        :meth:`recv`; on failure the other half is cancelled.
        """
        _, received = await run_all(self.send(peer_id, tag, tensors, codec=codec), self.recv(peer_id, tag))
        return received

    async def all_reduce(self, members: Sequence[str], tag: str, tensors: Sequence[Tensor], *, op: str = "mean",
                         timeout_s: float, codec: str | Codec = "raw") -> AllReduceResult:
        """Mean or sum of ``tensors`` over ``members`` (this node included), tolerating drops.

        Every member calls it with the same ``members``, ``tag`` and tensor specs. A member that
        fails mid-way is excluded and the rest finish; ``result.included`` says whose inputs the
        result reduces over. The rule for a dropped member's chunk is in :mod:`.allreduce`.

        Raises:
            ValueError: bad arguments (op, mixed or non-float dtypes, this node not a member).
            TimeoutError: ``timeout_s`` passed before the reduction completed.
            PeerError: no member's contribution reached every owner.
        """
        self._check_open()
        return await self._allreduce.run(members, tag, tensors, op=op, timeout_s=timeout_s, codec=codec)

    @property
    def budget(self) -> TransferBudget:
        """The byte limits this plane applies to peers now (see :meth:`set_budget`)."""
        return self._budget

    def set_budget(self, budget: TransferBudget) -> None:
        """Apply new byte limits at once, to data connections already open too.

        The daemon calls it when it learns the size of the model its run trains
        (:func:`~.budget.budget_for_state`). A transfer already admitted keeps the limits it was
        admitted under; bytes already held count against the new pool (it may start over it).
        """
        self._budget = budget
        self._limits = replace(self._limits, max_transfer_bytes=budget.max_transfer_bytes)
        self._mailbox.max_unclaimed_bytes = budget.max_unclaimed_bytes
        self._mailbox.max_unclaimed_bytes_per_peer = budget.max_unclaimed_bytes_per_peer
        for sessions in self._sessions.values():
            for session in sessions:
                session.set_limits(self._limits)

    def drop_unclaimed(self, prefix: str) -> int:
        """Forget received transfers nobody claimed whose tag starts with ``prefix``."""
        return self._mailbox.purge(prefix)

    def serve(self, route: str, handler: RouteHandler) -> None:
        """Answer :meth:`request` calls for ``route`` with ``handler`` (one task per request)."""
        self._requests.serve(route, handler)

    async def request(self, peer_id: str, route: str, meta: dict[str, Any] | None = None,
                      tensors: Sequence[Tensor] = (), *, codec: str | Codec = "raw") -> Reply:
        """Ask ``peer_id``'s ``route`` handler and return its reply.

        Raises:
            RemoteError: the handler answered with an error.
            Refused / PeerError / ClosedError: as :meth:`send`.
        """
        with self._requests.expect(peer_id) as (request_id, fut):
            begin = Begin(route, specs_of(tensors), Codec.named(codec), KIND_REQUEST, request_id, dict(meta or {}))
            await self._transfer(peer_id, begin, tensors)
            return Requests.check(await fut, peer_id, route)

    def stats(self) -> dict[str, Any]:
        """Per-peer path, connections and bytes by path, for the dashboard and /metrics."""
        peers: dict[str, Any] = {}
        sent: dict[str, int] = {}
        received: dict[str, int] = {}
        for peer, st in sorted(self._stats.items()):
            live = [s for s in self._sessions.get(peer, []) if not s.is_closed]
            peers[peer] = {
                "path": st.path, "sessions": len(live), "opened_by_path": dict(st.opened),
                "bytes_sent": dict(st.traffic.sent), "bytes_received": dict(st.traffic.received),
                "transfers_sent": st.transfers_sent, "transfers_received": st.transfers_received,
                "failures": st.failures, "last_error": st.last_error,
                "unclaimed_bytes": self._mailbox.unclaimed_by(peer),
            }
            for path, n in st.traffic.sent.items():
                sent[path] = sent.get(path, 0) + n
            for path, n in st.traffic.received.items():
                received[path] = received.get(path, 0) + n
        return {"data_addrs": list(self.data_addrs), "peers": peers, "bytes_sent": sent,
                "bytes_received": received, "unclaimed_bytes": self._mailbox.unclaimed_bytes,
                "recv_pool_bytes": self._buffers.kept_bytes, "recv_pool_reused": self._buffers.reused}

    # ---- sending ---------------------------------------------------------------------------

    async def _transfer(self, peer_id: str, begin: Begin, tensors: Sequence[Tensor]) -> None:
        self._check_open()
        if peer_id == self.peer_id:
            raise ValueError("cannot send tensors to this node itself")
        if not 0 < len(begin.tag) <= MAX_TAG_CHARS:
            raise ValueError(f"tag must be 1-{MAX_TAG_CHARS} characters, got {len(begin.tag)}")
        if begin.codec.name != "raw" and begin.nbytes > ENCODE_IN_THREAD_BYTES:
            pieces = await asyncio.to_thread(lambda: [begin.codec.encode(t) for t in tensors])
        else:
            pieces = [begin.codec.encode(t) for t in tensors]
        stats = self._peer(peer_id)
        for attempt in range(3):
            session, fresh = await self._acquire(peer_id)
            try:
                await session.send(begin, pieces)
                stats.transfers_sent += 1
                return
            except (NotSent, ClosedError) as exc:
                if fresh or attempt == 2:  # a new connection that fails at once is a real failure
                    stats.failures += 1
                    stats.last_error = str(exc)
                    raise PeerError(f"transfer {begin.tag!r} to {peer_id} failed: {exc}") from exc
                log.debug("reused data connection to %s was dead (%s); retrying on another", peer_id, exc)
            except PeerError as exc:
                stats.failures += 1
                stats.last_error = str(exc)
                raise
            finally:
                self._release(session)
        raise AssertionError("unreachable")

    async def _acquire(self, peer_id: str) -> tuple[Session, bool]:
        """An idle session to ``peer_id`` reserved for one transfer (dialing one if allowed)."""
        while True:
            self._check_open()
            live = [s for s in self._sessions.get(peer_id, []) if not s.is_closed]
            idle = next((s for s in live if s not in self._reserved and not s.busy), None)
            if idle is not None:
                self._reserved.add(idle)
                return idle, False
            if len(live) + self._dialing.get(peer_id, 0) < self.config.max_sessions_per_peer:
                self._dialing[peer_id] = self._dialing.get(peer_id, 0) + 1
                try:
                    session = await self._dial(peer_id)
                finally:
                    self._dialing[peer_id] -= 1
                    self._notify(peer_id)
                self._reserved.add(session)
                return session, True
            event = self._changed.setdefault(peer_id, asyncio.Event())
            await event.wait()

    def _release(self, session: Session) -> None:
        self._reserved.discard(session)
        self._notify(session.peer_id)

    def _notify(self, peer_id: str) -> None:
        event = self._changed.pop(peer_id, None)
        if event is not None:
            event.set()

    async def _dial(self, peer_id: str) -> Session:
        stats = self._peer(peer_id)
        try:
            link = await connect.dial(
                lambda: self.host.open_stream(peer_id, PROTOCOL_ID, max_frame_bytes=stream_frame_limit(self._limits)),
                local_id=self.peer_id, remote_id=peer_id, direct=self.config.direct_dial,
                local_addrs=self.data_addrs, limits=self._limits, dial_timeout_s=self.config.dial_timeout_s,
                handshake_timeout_s=self.config.handshake_timeout_s, is_relayed=lambda: self._is_relayed(peer_id),
                puncher=self._puncher,
            )
        except PeerError as exc:
            stats.failures += 1
            stats.last_error = str(exc)
            raise
        session = self._adopt(peer_id, link)
        self._spawn(f"tensor-session {peer_id[-8:]}", self._run_session, session)
        return session

    async def _is_relayed(self, peer_id: str) -> bool:
        return any(p.peer_id == peer_id and p.connection == "relayed" for p in await self.host.peers())

    # ---- receiving -------------------------------------------------------------------------

    def _adopt(self, peer_id: str, link: connect.Link) -> Session:
        stats = self._peer(peer_id)
        session = Session(link.carrier, link.sealer, link.opener, peer_id=peer_id, limits=self._limits,
                          inbox=self, traffic=stats.traffic, send_frame_bytes=link.send_frame_bytes,
                          buffers=self._buffers)
        self._sessions.setdefault(peer_id, []).append(session)
        self._gone.discard(peer_id)
        stats.path = session.path
        stats.opened[session.path] = stats.opened.get(session.path, 0) + 1
        log.info("data connection with %s via %s (%s)", peer_id, session.path, link.carrier.remote)
        self._notify(peer_id)
        return session

    async def _run_inbound(self, peer_id: str, link: connect.Link) -> None:
        await self._run_session(self._adopt(peer_id, link))

    async def _run_session(self, session: Session) -> None:
        try:
            await session.run()
        except Exception:  # noqa: BLE001 — a bug on one connection must not take the plane down
            log.exception("data connection %s failed", session)
        finally:
            if session.violation is not None:
                self._guard.report(session.peer_id, "tensor.violation", Severity.MAJOR, str(session.violation))
            session.close("reader ended")
            sessions = self._sessions.get(session.peer_id, [])
            if session in sessions:
                sessions.remove(session)
            if not sessions:
                self._sessions.pop(session.peer_id, None)
                if self._mailbox.waiting_on(session.peer_id):
                    self._spawn("tensor-peer-gone", self._check_gone, session.peer_id)
            self._notify(session.peer_id)

    async def _on_stream(self, stream: MessageStream) -> None:
        self._check_open()
        peer = stream.peer_id
        live = sum(not s.is_closed for s in self._sessions.get(peer, []))
        self._guard.admit_session(peer, live + self._listener.pending_of(peer), 2 * self.config.max_sessions_per_peer)
        wait_s = self.config.handshake_timeout_s + 8 * self.config.dial_timeout_s
        try:
            link = await connect.answer(
                stream, local_id=self.peer_id, data_addrs=self.data_addrs, limits=self._limits,
                handshake_timeout_s=self.config.handshake_timeout_s, wait_fallback_s=wait_s,
                add_pending=self._listener.add_pending, drop_pending=self._listener.drop_pending,
                is_relayed=lambda: self._is_relayed(stream.peer_id), puncher=self._puncher,
                on_punched=self._listener.adopt_socket)
        except ProtocolViolation as exc:
            self._guard.report(peer, "tensor.handshake", Severity.MAJOR, str(exc))
            raise
        if link is None:
            return
        session = self._adopt(stream.peer_id, link)
        self._spawn(f"tensor-session {stream.peer_id[-8:]}", self._run_session, session)
        await session.closed.wait()  # the host closes the stream when this handler returns

    # ---- Inbox (called by sessions) --------------------------------------------------------

    def admit(self, session: Session, begin: Begin) -> None:
        self._check_open()
        peer = session.peer_id
        if begin.kind == KIND_REQUEST:
            if not self._requests.serves(begin.tag):
                raise PeerError(f"no handler for route {begin.tag!r:.60} here")
            self._guard.admit_request(peer, id(begin))
        if begin.kind == KIND_REPLY and self._requests.awaits(peer, begin.request_id):
            counted = False  # awaited: costs no budget
        else:
            key = begin.tag if begin.kind == KIND_MESSAGE else f"\x00{begin.kind}"
            try:
                counted = self._mailbox.reserve(peer, key, begin.nbytes)
            except HyphaeError:
                self._guard.release(peer, id(begin))  # refused: it will never be discarded
                raise
        self._admitted[id(begin)] = counted

    def discard(self, session: Session, begin: Begin) -> None:
        self._mailbox.unreserve(session.peer_id, begin.nbytes, self._admitted.pop(id(begin), False))
        self._guard.release(session.peer_id, id(begin))

    def deliver(self, session: Session, begin: Begin, tensors: list[Tensor]) -> None:
        peer = session.peer_id
        counted = self._admitted.pop(id(begin), False)
        self._peer(peer).transfers_received += 1
        if begin.kind == KIND_MESSAGE:
            self._mailbox.put(peer, begin.tag, Message(tensors, begin.meta), begin.nbytes, counted)
            return
        self._mailbox.unreserve(peer, begin.nbytes, counted)
        if begin.kind == KIND_REPLY:
            if not self._requests.resolve(peer, begin.request_id, Reply(begin.meta, tensors)):
                log.debug("late reply %d from %s dropped", begin.request_id, peer)
        elif self._closed or self._spawn(f"tensor-request {begin.tag[:40]}", self._answer, peer, begin, tensors) is None:
            self._guard.release(peer, id(begin))

    async def _answer(self, peer: str, begin: Begin, tensors: list[Tensor]) -> None:
        try:
            reply = await self._requests.handle(peer, begin.tag, begin.meta, tensors)
        finally:
            self._guard.release(peer, id(begin))
        try:
            out = Begin(begin.tag, specs_of(reply.tensors), Codec.named(reply.codec), KIND_REPLY, begin.request_id,
                        dict(reply.meta))
            await self._transfer(peer, out, reply.tensors)
        except HyphaeError as exc:
            log.debug("reply to %s on %s failed: %s", peer, begin.tag, exc)
        finally:
            if reply.sent is not None:
                reply.sent()

    # ---- peers and upkeep ------------------------------------------------------------------

    def _peer(self, peer_id: str) -> _PeerStats:
        return self._stats.setdefault(peer_id, _PeerStats())

    def _on_peer_event(self, kind: str, peer_id: str) -> None:
        if kind == "connected":
            self._gone.discard(peer_id)
        elif kind == "disconnected" and not self._closed:
            self._spawn("tensor-peer-gone", self._check_gone, peer_id)

    async def _check_gone(self, peer_id: str) -> None:
        """Fail what waits on a peer that left libp2p once its last data connection is gone too.

        Polled briefly: the readers of connections that died with it notice a moment later.
        """
        for _ in range(GONE_POLLS):
            await asyncio.sleep(GONE_POLL_S)
            if any(p.peer_id == peer_id for p in await self.host.peers()):
                return  # back (or never left): nothing to fail
            if not any(not s.is_closed for s in self._sessions.get(peer_id, [])):
                break
        else:
            return
        log.debug("%s is gone: failing what waits on it", peer_id)
        self._gone.add(peer_id)
        gone = PeerError(f"{peer_id} disconnected")
        self._mailbox.fail(peer_id, gone)
        self._requests.fail(peer_id, gone)

    async def _upkeep(self) -> None:
        period = min(5.0, self.config.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            self._mailbox.expire(now)
            self._listener.expire(now)
            self._buffers.trim(now)
            for sessions in list(self._sessions.values()):
                for session in list(sessions):
                    idle = now - session.last_used > self.config.idle_timeout_s
                    if idle and not session.busy and session not in self._reserved:
                        await session.aclose()


@contextlib.asynccontextmanager
async def open_tensor_plane(host: Host, config: TensorConfig | None = None, *,
                            puncher: connect.Puncher | None = None) -> AsyncIterator[TensorPlane]:
    """Start a :class:`TensorPlane` on a started ``host``; yield it once it listens.

    Args:
        host: the daemon's libp2p host (the plane registers ``/hyphae/tensor/1`` on it).
        config: listen addresses and limits (defaults: all interfaces, 1 MiB frames).
        puncher: the hole-punching hook of :mod:`.connect` (the NAT issue provides one).

    On exit every data connection is closed and every plane task has ended.
    """
    body_error: BaseException | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            plane = TensorPlane(host, config or TensorConfig(), tg, puncher=puncher)
            try:
                await plane._start()
                yield plane
            except Exception as exc:
                body_error = exc
                raise
            finally:
                await plane.aclose()
    except ExceptionGroup as group:
        # The plane's own tasks never raise; unwrap the caller's exception from the group.
        if body_error is not None and len(group.exceptions) == 1 and group.exceptions[0] is body_error:
            raise body_error from None
        raise
