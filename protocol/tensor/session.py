"""One encrypted data connection to one peer: sealed frames in both directions, transfers on top.

Either side may send on a session; each direction carries one transfer at a time (``BEGIN``,
``DATA``..., ``END``, answered by ``ACK`` on the other direction, which may interleave with that
direction's own transfer frame by frame). The reader task (:meth:`Session.run`) owns the
incoming direction: it checks every header against the limits, decrypts DATA frames straight
into the transfer's single receive buffer, and hands a finished, verified transfer to the
:class:`Inbox`. A transfer that breaks (bad tag, truncation, a frame out of place, a refused
header, the connection dropping) is discarded whole and the session closes: the receiver never
sees partial tensors, and a connection whose nonce sequence is in doubt is never reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import numpy as np

from ..errors import ClosedError, EndOfStream, HyphaeError, PeerError, ProtocolViolation
from ._bufpool import BufferPool
from .carrier import Carrier
from .errors import NotSent, Refused
from .keys import FrameOpener, FrameSealer
from .spec import Tensor
from .wire import HEADER_BYTES, TAG_BYTES, Ack, Begin, FrameType, Limits, iter_frames

__all__ = ["Session", "Inbox", "Traffic"]

log = logging.getLogger(__name__)

DECODE_IN_THREAD_BYTES = 1 << 20
"""Decoding a quantized transfer larger than this runs in a thread (numpy releases the GIL)."""


class Traffic:
    """Bytes moved, by path; shared by every session to one peer."""

    def __init__(self) -> None:
        self.sent: dict[str, int] = {}
        self.received: dict[str, int] = {}

    def add(self, path: str, *, sent: int = 0, received: int = 0) -> None:
        if sent:
            self.sent[path] = self.sent.get(path, 0) + sent
        if received:
            self.received[path] = self.received.get(path, 0) + received


class Inbox(Protocol):
    """Where a session's incoming transfers go (the plane)."""

    def admit(self, session: Session, begin: Begin) -> None:
        """Accept a transfer header before anything is allocated; raise to refuse it."""

    def deliver(self, session: Session, begin: Begin, tensors: list[Tensor]) -> None:
        """Take a complete, verified transfer (must not block)."""

    def discard(self, session: Session, begin: Begin) -> None:
        """An admitted transfer will never complete; release what :meth:`admit` reserved."""


class _Incoming:
    """The transfer being received: one buffer of exactly the announced wire size."""

    def __init__(self, begin: Begin, buffers: BufferPool | None) -> None:
        self.begin = begin
        size = begin.wire_bytes
        self.buffer = buffers.take(size) if buffers is not None else np.empty(size, dtype=np.uint8)
        self.view = memoryview(self.buffer)
        self.filled = 0

    def take(self, n: int) -> memoryview:
        if n == 0 or self.filled + n > len(self.view):
            raise ProtocolViolation(f"DATA frame of {n} bytes after {self.filled} of the {len(self.view)} announced")
        view = self.view[self.filled:self.filled + n]
        self.filled += n
        return view

    def decode(self) -> list[Tensor]:
        out: list[Tensor] = []
        codec, off = self.begin.codec, 0
        for spec in self.begin.specs:
            n = codec.wire_nbytes(spec)
            out.append(Tensor(spec, codec.decode(spec, self.view[off:off + n])))
            off += n
        return out


class Session:
    """An authenticated, encrypted data connection (built by :mod:`.connect`).

    Args:
        carrier: the socket or stream under it.
        sealer / opener: this side's outgoing and incoming frame ciphers (handshake frames
            already counted).
        peer_id: the verified remote peer.
        limits: what the reader accepts.
        inbox: where complete incoming transfers go.
        traffic: byte counters to add to.
        send_frame_bytes: DATA frame size to send (agreed in the handshake: the smaller limit).
        buffers: where receive buffers come from (reused once their tensors are gone).
    """

    def __init__(self, carrier: Carrier, sealer: FrameSealer, opener: FrameOpener, *, peer_id: str,
                 limits: Limits, inbox: Inbox, traffic: Traffic, send_frame_bytes: int | None = None,
                 buffers: BufferPool | None = None) -> None:
        self.carrier = carrier
        self.path = carrier.path
        self.peer_id = peer_id
        self._sealer, self._opener = sealer, opener
        self._limits = limits
        self._send_frame = min(send_frame_bytes or limits.max_frame_bytes, limits.max_frame_bytes)
        self._inbox = inbox
        self._traffic = traffic
        self._buffers = buffers
        self._write_lock = asyncio.Lock()
        self._out_lock = asyncio.Lock()
        self._sendbuf = memoryview(bytearray(HEADER_BYTES + limits.max_frame_bytes + TAG_BYTES))
        self._staging = memoryview(bytearray(limits.max_frame_bytes))
        self._ack: asyncio.Future[Ack] | None = None
        self._incoming: _Incoming | None = None
        self._draining = False
        self._reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.violation: ProtocolViolation | None = None
        """Set when the peer broke the protocol on this connection (for its score)."""
        self.last_used = time.monotonic()

    def set_limits(self, limits: Limits) -> None:
        """What the reader accepts from the next header on (the frame size cannot change: the
        buffers are sized for it)."""
        if limits.max_frame_bytes != self._limits.max_frame_bytes:
            raise ValueError(f"a session's frame size is fixed at {self._limits.max_frame_bytes}, "
                             f"got {limits.max_frame_bytes}")
        self._limits = limits

    def __repr__(self) -> str:
        return f"<Session {self.peer_id[-8:]} {self.path} {self.carrier.remote}>"

    @property
    def busy(self) -> bool:
        """Whether an outgoing transfer holds this session."""
        return self._out_lock.locked()

    @property
    def is_closed(self) -> bool:
        return self.closed.is_set()

    # ---- lifecycle -------------------------------------------------------------------------

    def close(self, reason: str) -> None:
        """Stop the connection now (idempotent). A transfer in progress either way fails.

        The reader task (:meth:`run`) notices, releases the socket or stream, and ends.
        """
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        self.carrier.abort()
        if not self.carrier.wakes_on_abort and self._reader is not None and self._reader is not asyncio.current_task():
            self._reader.cancel()
        if self._ack is not None and not self._ack.done():
            self._ack.set_exception(PeerError(f"data connection to {self.peer_id} closed: {reason}"))

    async def run(self) -> None:
        """Read and dispatch frames until the connection ends; never raises for peer faults.

        Cancelling it closes the session. On return the socket/stream is released, an incoming
        transfer in progress is discarded, and a send waiting for its ACK fails.
        """
        self._reader = asyncio.current_task()
        reason = "peer closed the connection"
        try:
            while not self.closed.is_set():
                try:
                    ftype, header, body = await self.carrier.read_frame(self._limits)
                except EndOfStream:
                    break
                self._traffic.add(self.path, received=HEADER_BYTES + len(body))
                if not await self._on_frame(ftype, header, body):
                    break
        except ProtocolViolation as exc:
            reason = f"protocol violation: {exc}"
            self.violation = exc
            log.warning("closing data connection from %s (%s): %s", self.peer_id, self.carrier.remote, exc)
        except (PeerError, ClosedError) as exc:
            reason = str(exc)
            log.debug("data connection %s ended: %s", self, exc)
        finally:
            self.close(reason)
            if self._incoming is not None:
                self._inbox.discard(self, self._incoming.begin)
                self._incoming = None
            await self.carrier.aclose()

    # ---- incoming --------------------------------------------------------------------------

    async def _on_frame(self, ftype: FrameType, header: bytes, body: memoryview) -> bool:
        """Handle one frame; False when the peer said CLOSE."""
        self.last_used = time.monotonic()
        if ftype is FrameType.DATA:
            if self._draining:
                return True  # a refused transfer's frames, still in flight: dropped unread
            incoming = self._incoming
            if incoming is None:
                raise ProtocolViolation("DATA frame outside a transfer")
            self._opener.open_into(header, body, incoming.take(len(body) - TAG_BYTES))
        elif self._draining:
            return False  # the sender stopped (or lies): the connection ends here
        elif ftype is FrameType.BEGIN:
            if self._incoming is not None:
                raise ProtocolViolation("BEGIN inside a transfer")
            plaintext = self._opener.open(header, body)  # an authentication failure is not a refusal
            try:
                begin = Begin.from_bytes(plaintext, self._limits)
                self._inbox.admit(self, begin)
            except HyphaeError as exc:
                # Tell the sender why, then drop what it already sent until it stops; closing at
                # once could reset the connection before the reason is read.
                log.info("refusing a transfer from %s: %s", self.peer_id, exc)
                await self._refuse(str(exc))
                self._draining = True
                return True
            self._incoming = _Incoming(begin, self._buffers)
        elif ftype is FrameType.END:
            self._opener.open(header, body)
            await self._finish()
        elif ftype is FrameType.ACK:
            ack = Ack.from_bytes(self._opener.open(header, body))
            if self._ack is None or self._ack.done():
                raise ProtocolViolation("ACK without a transfer waiting for it")
            self._ack.set_result(ack)
        elif ftype is FrameType.CLOSE:
            self._opener.open(header, body)
            return False
        else:
            raise ProtocolViolation(f"{ftype.name} frame after the handshake")
        return True

    async def _finish(self) -> None:
        incoming, self._incoming = self._incoming, None
        if incoming is None:
            raise ProtocolViolation("END outside a transfer")
        delivered = False
        try:
            if incoming.filled != len(incoming.view):
                raise ProtocolViolation(f"END after {incoming.filled} of {len(incoming.view)} announced bytes")
            if incoming.begin.codec.name != "raw" and incoming.filled > DECODE_IN_THREAD_BYTES:
                tensors = await asyncio.to_thread(incoming.decode)
            else:
                tensors = incoming.decode()
            self._inbox.deliver(self, incoming.begin, tensors)
            delivered = True
        finally:
            if not delivered:
                self._inbox.discard(self, incoming.begin)
        await self._send_control(FrameType.ACK, Ack(True).to_bytes())

    async def _refuse(self, reason: str) -> None:
        """Tell the sender why (best effort) before the connection closes.

        Only when the write side is idle: if this side is itself mid-transfer, waiting for the
        lock could deadlock with a peer doing the same; the sender then just sees the close.
        """
        if self._write_lock.locked():
            return
        try:
            async with asyncio.timeout(1.0):
                await self._send_control(FrameType.ACK, Ack(False, reason).to_bytes())
        except (TimeoutError, HyphaeError):
            pass  # the close says enough

    # ---- outgoing --------------------------------------------------------------------------

    async def _send_control(self, ftype: FrameType, body: bytes) -> None:
        async with self._write_lock:
            frame = self._sealer.seal(ftype, body)
            await self.carrier.write(frame)
        self._traffic.add(self.path, sent=len(frame))

    async def _send_data(self, plaintext: memoryview) -> None:
        async with self._write_lock:
            n = self._sealer.seal_into(FrameType.DATA, plaintext, self._sendbuf)
            await self.carrier.write(self._sendbuf[:n])
        self._traffic.add(self.path, sent=n)

    async def send(self, begin: Begin, pieces: list[memoryview]) -> None:
        """Send one transfer and wait until the receiver acknowledged it.

        ``pieces`` are the wire bytes (concatenated, exactly ``begin.wire_bytes``); they are read
        in place and must not change until this returns.

        Raises:
            Refused: the receiver refused it (its reason in the message).
            PeerError: the connection broke first; whether the receiver kept anything is
                unknown, but it never keeps a partial transfer.
            ClosedError: this session was already closed.

        Cancelling it closes the session (a half-sent transfer leaves the connection's frame
        sequence unusable); the receiver discards what it had.
        """
        if self.closed.is_set():
            raise ClosedError(f"data connection to {self.peer_id} is closed: {self.close_reason}")
        async with self._out_lock:
            self.last_used = time.monotonic()
            ack_future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
            self._ack = ack_future
            ended = finished = False
            try:
                await self._send_control(FrameType.BEGIN, begin.to_bytes())
                for frame in iter_frames(pieces, self._send_frame, self._staging):
                    if ack_future.done():
                        break  # refused early: stop sending, the reason is in the ACK
                    await self._send_data(frame)
                if not ack_future.done():
                    await self._send_control(FrameType.END, b"")
                    ended = True
                ack = await ack_future
                finished = True
            except PeerError as exc:
                if ack_future.done() and not ack_future.cancelled() and ack_future.exception() is None:
                    ack = ack_future.result()  # refused, and the connection closed under our frames
                    finished = True
                elif not ended:
                    raise NotSent(str(exc)) from exc
                else:
                    raise
            finally:
                self._ack = None
                if not finished:
                    self.close("a transfer was interrupted")
            self.last_used = time.monotonic()
        if not ack.ok:
            self.close("the receiver refused a transfer")
            raise Refused(f"{self.peer_id} refused transfer {begin.tag!r}: {ack.error}")

    async def aclose(self) -> None:
        """Say CLOSE (best effort) and stop. Idempotent."""
        if not self.closed.is_set() and not self.busy:
            try:
                async with asyncio.timeout(1.0):
                    await self._send_control(FrameType.CLOSE, b"")
            except (TimeoutError, HyphaeError):
                pass  # already broken or not reading: closing anyway
        self.close("closed by this side")
