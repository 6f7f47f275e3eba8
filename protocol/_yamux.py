"""A lean yamux stream muxer for py-libp2p 0.8.1, wire-compatible with its ``Yamux`` and go-yamux.

Why: py-libp2p's own yamux costs ~420 us of CPU per side per small message, almost all of it
trio scheduler passes (a reader task handing frames over through per-stream events, a
``trio.Lock`` acquisition -- always a checkpoint -- around every buffer and window access, an
explicit checkpoint after each write) and f-string debug logging evaluated on every frame.

How this one differs:

* One reader task per connection parses every complete frame in what one read returns and
  dispatches it *synchronously*: data is appended to the stream's ``bytearray`` and the parked
  reader (if any) is woken directly through a ``ParkingLot``. No events, no locks.
* Writers write from their own task. The only lock is :class:`_SendLock`, which takes no
  scheduler pass when uncontended, and the frame write itself cannot be cancelled half-way,
  because a frame cut in half (or a Noise nonce spent on a message never sent) breaks the
  connection for every stream, not only the cancelled one. A write that makes no progress for
  10 s closes the connection instead (go-yamux's ConnectionWriteTimeout; _noise_buffered.py).
* Flow control as go-yamux: a 256 KiB window per stream, credit returned in one WINDOW_UPDATE
  once half the window has been consumed, writers park on a ``ParkingLot`` at zero window and
  are woken by the peer's WINDOW_UPDATE (no polling). A DATA frame larger than the credit we
  granted is a protocol error: GO_AWAY(protocol error) and the connection is closed.
* SYN is sent with the stream's first frame (usually its first DATA), ACK with the accepting
  side's first DATA or WINDOW_UPDATE, saving one frame (one Noise message, one syscall) each
  way per stream. py-libp2p's Yamux ignores FIN/RST in a frame that carries ACK, so an ACK is
  never combined with them.
* The reader never blocks on a write: the rare frames it must send itself (PING replies, RST
  for a refused stream) run as separate tasks. We answer PINGs but send none (py-libp2p's
  ``rtt()`` has no caller in 0.8.1; liveness is libp2p's ping protocol's job).
* ``read`` and ``write`` yield to the scheduler only when they must wait (no data, no window, a
  full socket): a checkpoint costs a full scheduler pass, and py-libp2p's ``NetStream`` already
  takes a ``trio.Lock`` around every call.
* A received GO_AWAY tears the connection down, as py-libp2p's Yamux does (it and go-yamux
  send GO_AWAY when closing, right before closing the socket).
* Budgets per connection (one connection per peer, so per peer): every stream is granted the
  spec's 256 KiB window, so a peer that opens streams and writes without us reading could park
  ~250 MiB per connection in our buffers (measured: 300 streams x 256 KiB raised a daemon's RSS
  by 65 MiB, never returned). Until the host calls :meth:`LeanYamux.admit` (the peer passed
  hello) a connection gets :data:`UNADMITTED_MAX_INBOUND_STREAMS` inbound streams, each
  holding at most :data:`UNADMITTED_STREAM_BYTES` unread and all at most
  :data:`UNADMITTED_BUFFER_BYTES`; after it, :data:`MAX_INBOUND_STREAMS` and
  :data:`MAX_BUFFERED_BYTES`. A stream that would go over is reset (its bytes dropped); the
  connection and its other streams go on. When the connection is lost, only a stream the peer
  had finished (FIN) and we still read keeps its bytes: py-libp2p keeps referencing a dead
  connection's streams, and their unread buffers with them (measured: a gone flooder's 16 MiB).

Errors: ``read`` raises ``MuxedStreamEOF`` after the peer's FIN and ``MuxedStreamReset`` after a
RST or a lost connection (buffered data is returned first after the peer's FIN, unless we had
closed our side or the stream was reset); ``write``
raises ``MuxedStreamClosed`` after our own close and ``MuxedStreamReset`` after a RST or a lost
connection; ``open_stream`` / ``accept_stream`` raise ``MuxedConnUnavailable`` once the
connection is closing. Cancelling ``read`` or a writer waiting for window loses nothing.

py-libp2p 0.8.1's ``MuxerMultistream.new_conn`` hard-codes its own ``Yamux`` for
``/yamux/1.0.0`` whatever ``muxer_opt`` says, so a host must also get :func:`honor_muxer_opt`.
"""

from __future__ import annotations

import inspect
import logging
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio
from libp2p.abc import ConnectionType, IHost, IMuxedConn, IMuxedStream, ISecureConn
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import (
    MuxedConnUnavailable,
    MuxedStreamClosed,
    MuxedStreamEOF,
    MuxedStreamReset,
)
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream

from ._noise_buffered import open_chunk_io

__all__ = ["LeanYamux", "LeanYamuxStream", "honor_muxer_opt", "PROTOCOL_ID"]

log = logging.getLogger(__name__)

PROTOCOL_ID = "/yamux/1.0.0"
_HEADER = struct.Struct(">BBHII")  # version, type, flags, stream id, length
HEADER_SIZE = 12
TYPE_DATA, TYPE_WINDOW_UPDATE, TYPE_PING, TYPE_GO_AWAY = 0, 1, 2, 3
FLAG_SYN, FLAG_ACK, FLAG_FIN, FLAG_RST = 1, 2, 4, 8
GO_AWAY_NORMAL, GO_AWAY_PROTOCOL_ERROR = 0, 1

INITIAL_WINDOW = 256 * 1024  # fixed by the spec; we never grant more per stream
# Header + payload fit one Noise message (65535 - 16 byte tag), so a frame is one encryption.
MAX_DATA_PAYLOAD = 65535 - 16 - HEADER_SIZE
ACCEPT_BACKLOG = 256  # inbound streams not yet accepted; beyond it new ones are refused (RST)
MAX_INBOUND_STREAMS = 512  # open inbound streams per admitted connection (go-yamux: 1000)
MAX_BUFFERED_BYTES = 16 << 20  # received, unread bytes per admitted connection, all streams
UNADMITTED_MAX_INBOUND_STREAMS = 8  # before hello: identify, hello, pubsub, DHT, ping need fewer
UNADMITTED_STREAM_BYTES = 64 << 10  # unread bytes one stream may hold before hello
UNADMITTED_BUFFER_BYTES = 256 << 10  # unread bytes the whole connection may hold before hello
_MAX_STREAM_ID = 0xFFFFFFFF
# How a transport says "the connection is gone"; anything else from the reader is logged as a bug.
_EXPECTED_READ_ERRORS = (OSError, EOFError, ValueError, trio.BrokenResourceError, trio.ClosedResourceError,
                         BaseLibp2pError)


class _ProtocolError(Exception):
    """The peer broke the yamux spec; the connection is closed with GO_AWAY(protocol error)."""


class _GoAway(Exception):
    """The peer sent GO_AWAY: the connection is torn down."""


class _SendLock:
    """A FIFO mutex that takes no scheduler pass when free (``trio.Lock`` always checkpoints).

    ``release`` hands the lock straight to the first parked task, so ownership never lapses.
    """

    __slots__ = ("_held", "_lot")

    def __init__(self) -> None:
        self._held = False
        self._lot = trio.lowlevel.ParkingLot()

    @property
    def locked(self) -> bool:
        return self._held

    async def acquire(self) -> None:
        if self._held:
            await self._lot.park()  # woken by release() as the new owner
        else:
            self._held = True

    def release(self) -> None:
        if not self._lot.unpark():
            self._held = False


class LeanYamuxStream(IMuxedStream):
    """One yamux stream. State changes come from the connection's reader, synchronously."""

    __slots__ = (
        "conn", "muxed_conn", "stream_id", "is_initiator", "_rbuf", "_recv_window", "_consumed",
        "_send_window", "_open_flags", "_local_closed", "_remote_closed", "_reset", "_lost",
        "_read_lot", "_window_lot",
    )

    def __init__(self, conn: LeanYamux, stream_id: int, *, inbound: bool) -> None:
        self.conn = conn
        self.muxed_conn = conn
        self.stream_id = stream_id
        self.is_initiator = not inbound
        self._rbuf = bytearray()
        self._recv_window = INITIAL_WINDOW  # credit the peer still has
        self._consumed = 0  # bytes read by the app and not yet given back as credit
        self._send_window = INITIAL_WINDOW
        self._open_flags = FLAG_ACK if inbound else FLAG_SYN  # to put on our first frame
        self._local_closed = False  # we sent FIN
        self._remote_closed = False  # we received FIN
        self._reset = False  # RST sent or received
        self._lost: str | None = None  # why the connection died, if it did
        self._read_lot = trio.lowlevel.ParkingLot()
        self._window_lot = trio.lowlevel.ParkingLot()

    # ---- reading -----------------------------------------------------------------------------

    async def read(self, n: int | None = None) -> bytes:
        """Return up to ``n`` bytes (all buffered bytes if ``n`` is None or negative).

        Waits until data, FIN, RST or connection loss. Raises MuxedStreamEOF after the peer's FIN
        once the buffer is empty, MuxedStreamReset after a RST or on a lost connection.
        """
        if n == 0:
            return b""
        while not self._rbuf:
            if self._reset:
                raise MuxedStreamReset(f"stream {self.stream_id} was reset")
            if self._remote_closed:
                raise MuxedStreamEOF(f"stream {self.stream_id}: peer closed its side")
            if self._lost is not None:
                raise MuxedStreamReset(f"stream {self.stream_id}: connection lost ({self._lost})")
            if self._open_flags == FLAG_SYN:
                # The peer learns of a stream from its first frame; announce it before waiting.
                await self._send_control(0, 0)
                continue  # data may have arrived while we were sending
            await self._read_lot.park()
        buf = self._rbuf
        if n is None or n < 0 or n >= len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        self.conn.buffered_bytes -= len(data)
        self._consumed += len(data)
        if self._consumed >= INITIAL_WINDOW // 2 and not self._remote_closed:
            await self._grant_credit()
        return data

    async def _grant_credit(self) -> None:
        """Give the peer back what the app consumed (go-yamux: once half a window is owed)."""
        delta, self._consumed = self._consumed, 0
        self._recv_window += delta
        try:
            await self._send_control(0, delta)
        except MuxedConnUnavailable:
            pass  # the data was read; the next read reports the loss

    # ---- writing -----------------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        """Send ``data``, in frames of at most the send window, parking while the window is 0.

        Raises MuxedStreamClosed after our close(), MuxedStreamReset after a RST or on a lost
        connection. Cancelled while waiting for window: the frames already sent stay sent.
        """
        view = memoryview(data)
        sent, total = 0, len(view)
        self._check_writable()
        while sent < total:
            if self._send_window == 0:
                await self._window_lot.park()
                self._check_writable()
                continue
            size = min(total - sent, self._send_window, MAX_DATA_PAYLOAD)
            self._send_window -= size
            flags, self._open_flags = self._open_flags, 0
            header = _HEADER.pack(0, TYPE_DATA, flags, self.stream_id, size)
            try:
                await self.conn._send(header + view[sent:sent + size])
            except MuxedConnUnavailable as exc:
                raise MuxedStreamReset(f"stream {self.stream_id}: {exc}") from exc
            sent += size
            if sent < total:
                self._check_writable()

    def _check_writable(self) -> None:
        if self._reset:
            raise MuxedStreamReset(f"stream {self.stream_id} was reset")
        if self._local_closed:
            raise MuxedStreamClosed(f"stream {self.stream_id} is closed for writing")
        if self._lost is not None:
            raise MuxedStreamReset(f"stream {self.stream_id}: connection lost ({self._lost})")

    async def _send_control(self, flags: int, delta: int) -> None:
        """Send a WINDOW_UPDATE carrying ``flags`` plus any pending SYN/ACK.

        py-libp2p's Yamux ignores FIN and RST on a frame that also carries ACK, so a pending ACK
        goes in a frame of its own ahead of them (both in one write).
        """
        pending, self._open_flags = self._open_flags, 0
        frame = b""
        if pending == FLAG_ACK and flags & (FLAG_FIN | FLAG_RST):
            frame = _HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_ACK, self.stream_id, 0)
        else:
            flags |= pending
        frame += _HEADER.pack(0, TYPE_WINDOW_UPDATE, flags, self.stream_id, delta)
        await self.conn._send(frame)

    # ---- closing -----------------------------------------------------------------------------

    async def close(self) -> None:
        """Half-close: send FIN; reading goes on until the peer's FIN. Idempotent."""
        if self._local_closed or self._reset:
            return
        self._local_closed = True
        self._window_lot.unpark_all()
        if self._lost is None:
            try:
                await self._send_control(FLAG_FIN, 0)
            except MuxedConnUnavailable:
                pass
        if self._remote_closed:
            self.conn._forget(self)

    async def close_write(self) -> None:
        """Same as :meth:`close` (yamux has no separate read close on the wire)."""
        await self.close()

    async def reset(self) -> None:
        """Abort both directions: send RST (if the peer knows the stream) and drop buffered data."""
        if self._reset:
            return
        announced = self._open_flags != FLAG_SYN
        self._mark_reset()
        if announced and self._lost is None:
            try:
                await self._send_control(FLAG_RST, 0)
            except MuxedConnUnavailable:
                pass

    def _mark_reset(self) -> None:
        self._reset = True
        self.conn.buffered_bytes -= len(self._rbuf)
        self._rbuf.clear()
        self._read_lot.unpark_all()
        self._window_lot.unpark_all()
        self.conn._forget(self)

    # ---- called by the connection's reader -----------------------------------------------------

    def _on_data(self, payload: memoryview) -> None:
        size = len(payload)
        if size > self._recv_window:
            raise _ProtocolError(f"stream {self.stream_id}: DATA of {size} bytes exceeds the "
                                 f"{self._recv_window} bytes of window granted")
        self._recv_window -= size
        if self._remote_closed or self._reset:
            return  # data after FIN/RST: dropped
        over = self.conn._over_budget(len(self._rbuf) + size, size)
        if over is not None:
            self.conn._reset_stream(self, over)
            return
        conn = self.conn
        conn.buffered_bytes += size
        if conn.buffered_bytes > conn.peak_buffered_bytes:
            conn.peak_buffered_bytes = conn.buffered_bytes
        self._rbuf += payload
        self._read_lot.unpark_all()

    def _on_window(self, delta: int) -> None:
        self._send_window += delta
        self._window_lot.unpark_all()

    def _on_fin(self) -> None:
        self._remote_closed = True
        self._read_lot.unpark_all()
        if self._local_closed:
            self.conn._forget(self)

    def _on_lost(self, reason: str) -> None:
        self._lost = reason
        if self._local_closed or not self._remote_closed:
            # Nobody will use half a message or an answer to a request already done with.
            self.conn.buffered_bytes -= len(self._rbuf)
            self._rbuf = bytearray()
        self._read_lot.unpark_all()
        self._window_lot.unpark_all()

    # ---- the rest of IMuxedStream ----------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self._reset or (self._local_closed and self._remote_closed) or self._lost is not None

    def set_deadline(self, ttl: int) -> None:
        raise NotImplementedError("yamux streams have no deadlines; use trio.fail_after at the call")

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.conn.get_remote_address()

    async def __aenter__(self) -> LeanYamuxStream:
        return self


class LeanYamux(IMuxedConn):
    """A yamux connection over a secured connection; constructed by py-libp2p's upgrader.

    Args:
        secured_conn: the Noise (or other) session the frames travel over.
        peer_id: the remote peer.
        is_initiator: whether we dialed (odd stream ids) or accepted (even); default: the
            secured connection's.
        on_close: awaited once when the connection ends, however it ends (SwarmConn sets it).
    """

    def __init__(self, secured_conn: ISecureConn, peer_id: ID, is_initiator: bool | None = None,
                 on_close: Callable[[], Awaitable[Any]] | None = None) -> None:
        self.secured_conn = secured_conn
        self.peer_id = peer_id
        self._initiator = secured_conn.is_initiator if is_initiator is None else is_initiator
        self.on_close = on_close
        self._read_chunk, self._write = open_chunk_io(secured_conn)
        self.event_started = trio.Event()
        self.event_closed = trio.Event()
        self._created_at = time.time()
        self._streams: dict[int, LeanYamuxStream] = {}
        self._next_id = 1 if self._initiator else 2
        self._inbound = 0
        self._admitted = False
        self.buffered_bytes = 0
        """Received bytes waiting in stream buffers for the application to read."""
        self.peak_buffered_bytes = 0
        """The most :attr:`buffered_bytes` ever were (the host trims the heap after a big one)."""
        self.streams_refused = 0
        """Inbound streams refused or reset for going over this connection's budgets."""
        self._accept_send, self._accept_recv = trio.open_memory_channel[LeanYamuxStream](ACCEPT_BACKLOG)
        self._lock = _SendLock()
        self._nursery: trio.Nursery | None = None
        self._dead: str | None = None  # why the connection ended; None while it is up
        self._closed_transport = False
        self._on_close_called = False
        self.bytes_sent = 0
        """Bytes written to / read from the secured connection (frames and headers): the
        control plane's traffic with this peer, for the dashboard and /metrics."""
        self.bytes_received = 0

    # ---- lifecycle -----------------------------------------------------------------------------

    @property
    def is_initiator(self) -> bool:
        return self._initiator

    @property
    def is_established(self) -> bool:
        return self.event_started.is_set() and self._dead is None

    @property
    def is_closed(self) -> bool:
        return self.event_closed.is_set()

    async def start(self) -> None:
        """Run the reader until the connection ends; then tear down and call ``on_close``.

        If cancelled (host shutdown), every stream is woken with a reset and the transport is
        closed, but ``on_close`` is not awaited: whoever cancelled is closing the swarm.
        """
        if self.event_started.is_set():
            return
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.event_started.set()
            reason = "reader cancelled"
            try:
                reason = await self._read_loop()
            finally:
                self._nursery = None  # from here on the transport is closed below, not by _spawn
                self._teardown(reason)
                nursery.cancel_scope.cancel()
                with trio.CancelScope(shield=True):
                    await self._close_transport()
                self.event_closed.set()
        await self._finish()

    async def close(self, error_code: int = GO_AWAY_NORMAL) -> None:
        """Send GO_AWAY (if no write is in progress), close the transport, wake every stream.

        Idempotent; streams then raise MuxedStreamReset (or EOF where the peer had sent FIN).
        """
        if self._dead is None:
            if not self._lock.locked:  # never wait behind a write stuck on a full socket
                await self._send_quietly(_HEADER.pack(0, TYPE_GO_AWAY, 0, 0, error_code))
            self._teardown("closed locally")
        await self._close_transport()
        await self._finish()

    async def _finish(self) -> None:
        self.event_closed.set()
        if self.on_close is not None and not self._on_close_called:
            self._on_close_called = True
            result = self.on_close()
            if inspect.isawaitable(result):
                await result

    async def _close_transport(self) -> None:
        if self._closed_transport:
            return
        self._closed_transport = True
        try:
            await self.secured_conn.close()
        except Exception as exc:  # noqa: BLE001 -- already going away; nothing else to do
            log.debug("closing the transport to %s failed: %r", self.peer_id, exc)

    def _teardown(self, reason: str) -> None:
        """Mark the connection dead and wake everyone: readers, writers, accept_stream."""
        if self._dead is not None:
            return
        self._dead = reason
        log.debug("yamux connection to %s ends: %s", self.peer_id, reason)
        self._accept_send.close()
        for stream in self._streams.values():
            stream._on_lost(reason)
        self._streams.clear()

    # ---- budgets ---------------------------------------------------------------------------------

    def admit(self) -> None:
        """The peer passed hello: give it the full stream and buffer budgets (idempotent)."""
        self._admitted = True

    @property
    def admitted(self) -> bool:
        return self._admitted

    def _over_budget(self, stream_bytes: int, size: int) -> str | None:
        """Why ``size`` more bytes for a stream that would then hold ``stream_bytes`` unread go
        over a budget; None if they fit."""
        if self._admitted:
            if self.buffered_bytes + size > MAX_BUFFERED_BYTES:
                return f"the connection would hold {self.buffered_bytes + size} unread bytes, limit {MAX_BUFFERED_BYTES}"
            return None
        if stream_bytes > UNADMITTED_STREAM_BYTES:
            return f"the stream would hold {stream_bytes} unread bytes before hello, limit {UNADMITTED_STREAM_BYTES}"
        if self.buffered_bytes + size > UNADMITTED_BUFFER_BYTES:
            return (f"the connection would hold {self.buffered_bytes + size} unread bytes before hello, "
                    f"limit {UNADMITTED_BUFFER_BYTES}")
        return None

    def _reset_stream(self, stream: LeanYamuxStream, why: str) -> None:
        """Reset one stream that went over a budget; the connection and its other streams go on."""
        self.streams_refused += 1
        level = logging.INFO if self.streams_refused == 1 else logging.DEBUG  # a flood is one line
        log.log(level, "resetting stream %d from %s (and any more that go over): %s", stream.stream_id, self.peer_id, why)
        stream._mark_reset()
        self._spawn(self._send_quietly, _HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, stream.stream_id, 0))

    # ---- streams ---------------------------------------------------------------------------------

    async def open_stream(self) -> LeanYamuxStream:
        """A new outbound stream; the peer learns of it with its first frame (SYN on it)."""
        if self._dead is not None:
            raise MuxedConnUnavailable(f"connection to {self.peer_id} is closed: {self._dead}")
        stream_id = self._next_id
        if stream_id > _MAX_STREAM_ID:
            raise MuxedConnUnavailable(f"connection to {self.peer_id} ran out of stream ids")
        self._next_id += 2
        stream = LeanYamuxStream(self, stream_id, inbound=False)
        self._streams[stream_id] = stream
        return stream

    async def accept_stream(self) -> LeanYamuxStream:
        """The next stream the peer opened; raises MuxedConnUnavailable once the connection ends."""
        try:
            return await self._accept_recv.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise MuxedConnUnavailable(f"connection to {self.peer_id} is closed: {self._dead}") from None

    def _forget(self, stream: LeanYamuxStream) -> None:
        if self._streams.pop(stream.stream_id, None) is not None and not stream.is_initiator:
            self._inbound -= 1

    # ---- writing ----------------------------------------------------------------------------------

    async def _send(self, frame: bytes) -> None:
        """Write whole frames, one writer at a time; the write itself cannot be cancelled half-way.

        Raises MuxedConnUnavailable if the connection is (or, by this write failing, becomes) dead.
        """
        if self._dead is not None:
            raise MuxedConnUnavailable(f"connection to {self.peer_id} is closed: {self._dead}")
        await self._lock.acquire()
        try:
            if self._dead is not None:
                raise MuxedConnUnavailable(f"connection to {self.peer_id} is closed: {self._dead}")
            await self._write(frame)  # atomic: completes, or fails and we close the connection
            self.bytes_sent += len(frame)
        except MuxedConnUnavailable:
            raise
        except Exception as exc:  # noqa: BLE001 -- any failed write leaves a torn frame behind
            self._teardown(f"write failed: {type(exc).__name__}: {exc}")
            self._spawn(self._close_transport)
            raise MuxedConnUnavailable(f"connection to {self.peer_id} failed: {exc}") from exc
        finally:
            self._lock.release()

    def _spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(fn, *args)

    async def _send_quietly(self, frame: bytes) -> None:
        """A frame nobody waits for (PING reply, RST, GO_AWAY); a dead connection is no error."""
        try:
            await self._send(frame)
        except MuxedConnUnavailable:
            pass

    # ---- reading ----------------------------------------------------------------------------------

    async def _read_loop(self) -> str:
        """Read and dispatch until the connection ends; return why it ended."""
        read_chunk = self._read_chunk
        buf = bytearray()
        try:
            while True:
                chunk = await read_chunk()
                if not chunk:
                    return "connection closed by peer"
                self.bytes_received += len(chunk)
                buf += chunk
                if len(buf) >= HEADER_SIZE:
                    del buf[:self._dispatch(buf)]
        except _ProtocolError as exc:
            log.warning("yamux protocol error from %s: %s; closing the connection", self.peer_id, exc)
            if not self._lock.locked:
                await self._send_quietly(_HEADER.pack(0, TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR))
            return f"protocol error: {exc}"
        except _GoAway as exc:
            return str(exc)
        except Exception as exc:  # noqa: BLE001 -- transports raise many types; all mean "gone"
            if self._dead is None:
                expected = isinstance(exc, _EXPECTED_READ_ERRORS)
                log.log(logging.DEBUG if expected else logging.WARNING, "yamux read from %s failed: %r",
                        self.peer_id, exc, exc_info=not expected)
            return f"read failed: {type(exc).__name__}: {exc}"

    def _dispatch(self, buf: bytearray) -> int:
        """Handle every complete frame in ``buf``; return how many bytes they took. No awaits."""
        pos, end = 0, len(buf)
        with memoryview(buf) as view:
            while end - pos >= HEADER_SIZE:
                version, kind, flags, stream_id, length = _HEADER.unpack_from(buf, pos)
                if version != 0:
                    raise _ProtocolError(f"unsupported yamux version {version}")
                if kind == TYPE_DATA:
                    if length > INITIAL_WINDOW:
                        raise _ProtocolError(f"DATA frame of {length} bytes, over any window we grant")
                    if end - pos - HEADER_SIZE < length:
                        break  # wait for the rest of the payload
                    start = pos + HEADER_SIZE
                    pos = start + length
                    stream = self._stream_for(stream_id, flags)
                    if stream is not None:
                        stream._on_data(view[start:pos])
                        self._apply_flags(stream, flags)
                    continue
                pos += HEADER_SIZE
                if kind == TYPE_WINDOW_UPDATE:
                    stream = self._stream_for(stream_id, flags)
                    if stream is not None:
                        if length:
                            stream._on_window(length)
                        self._apply_flags(stream, flags)
                elif kind == TYPE_PING:
                    self._on_ping(flags, length)
                elif kind == TYPE_GO_AWAY:
                    raise _GoAway(f"peer sent GO_AWAY (code {length})")
                else:
                    raise _ProtocolError(f"unknown frame type {kind}")
        return pos

    def _stream_for(self, stream_id: int, flags: int) -> LeanYamuxStream | None:
        """The stream a frame is for, opening it on SYN; None to drop the frame."""
        if not flags & FLAG_SYN:
            return self._streams.get(stream_id)  # unknown: a stream we already forgot
        if stream_id == 0 or (stream_id & 1) == (1 if self._initiator else 0):
            raise _ProtocolError(f"SYN with stream id {stream_id}, which is not the peer's to open")
        if stream_id in self._streams:
            raise _ProtocolError(f"SYN for stream {stream_id}, which is already open")
        if flags & FLAG_RST:
            return None  # opened and aborted at once: nothing to accept
        stream = LeanYamuxStream(self, stream_id, inbound=True)
        most = MAX_INBOUND_STREAMS if self._admitted else UNADMITTED_MAX_INBOUND_STREAMS
        if self._inbound >= most:
            self.streams_refused += 1
            self._refuse(stream_id, f"{most} inbound streams already open" + ("" if self._admitted else " before hello"))
            return None
        try:
            self._accept_send.send_nowait(stream)
        except trio.WouldBlock:
            self._refuse(stream_id, f"accept backlog of {ACCEPT_BACKLOG} is full")
            return None
        except trio.ClosedResourceError:
            return None
        self._streams[stream_id] = stream
        self._inbound += 1
        return stream

    def _refuse(self, stream_id: int, why: str) -> None:
        log.debug("refusing stream %d from %s: %s", stream_id, self.peer_id, why)
        self._spawn(self._send_quietly, _HEADER.pack(0, TYPE_WINDOW_UPDATE, FLAG_RST, stream_id, 0))

    @staticmethod
    def _apply_flags(stream: LeanYamuxStream, flags: int) -> None:
        if flags & FLAG_RST:
            stream._mark_reset()
        elif flags & FLAG_FIN:
            stream._on_fin()

    def _on_ping(self, flags: int, opaque: int) -> None:
        if flags & FLAG_SYN:  # we send no pings, so an ACK is not for us
            self._spawn(self._send_quietly, _HEADER.pack(0, TYPE_PING, FLAG_ACK, 0, opaque))

    # ---- addresses ---------------------------------------------------------------------------------

    def get_transport_addresses(self) -> list[multiaddr.Multiaddr]:
        return self.secured_conn.get_transport_addresses()

    def get_connection_type(self) -> ConnectionType:
        return self.secured_conn.get_connection_type()

    def get_remote_address(self) -> tuple[str, int] | None:
        return self.secured_conn.get_remote_address()


class _HonoringMuxerMultistream(MuxerMultistream):
    """``MuxerMultistream`` that builds the class registered for the negotiated protocol.

    py-libp2p 0.8.1's ``new_conn`` builds its own ``Yamux`` for ``/yamux/1.0.0`` regardless.
    """

    async def new_conn(self, conn: ISecureConn, peer_id: ID) -> IMuxedConn:
        protocol, transport_class = await self._selector.select(conn, conn.is_initiator, self.negotiate_timeout)
        return self._annotate_connection(transport_class(conn, peer_id), conn, protocol)


def honor_muxer_opt(host: IHost) -> None:
    """Make ``host`` build the muxer classes its ``muxer_opt`` names (call right after new_host).

    Raises:
        TypeError: the host's network has no py-libp2p ``TransportUpgrader`` to patch.
    """
    upgrader = getattr(host.get_network(), "upgrader", None)
    old = getattr(upgrader, "muxer_multistream", None)
    if not isinstance(old, MuxerMultistream):
        raise TypeError(f"cannot install muxers on {type(host.get_network()).__name__}: no upgrader "
                        "with a MuxerMultistream (py-libp2p's layout changed?)")
    upgrader.muxer_multistream = _HonoringMuxerMultistream(dict(old.transports), old.negotiate_timeout)
