"""What carries a data connection's sealed frames: a TCP socket, or a libp2p stream.

Both give the session the same two operations: read one frame (header checked against the
limits before the body is read) and write one sealed frame. The socket carrier reads straight
into a buffer it owns and hands out a view of it (valid until the next read), so a DATA frame is
copied once by the kernel and once by AES-GCM into the tensor's final memory; the stream
carrier is the slow but always-available path (direct or relayed libp2p), where each frame is
one msgpack ``bin`` message of the host's framed streams.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from abc import ABC, abstractmethod

from ..errors import EndOfStream, PeerError, ProtocolViolation
from ..stream import MessageStream
from .wire import HEADER_BYTES, TAG_BYTES, FrameType, Limits, parse_header

__all__ = ["Carrier", "SocketCarrier", "StreamCarrier", "PATH_DIRECT", "PATH_PUNCHED", "PATH_LIBP2P",
           "PATH_RELAYED", "stream_frame_limit"]

log = logging.getLogger(__name__)

PATH_DIRECT = "direct"
PATH_PUNCHED = "punched"
PATH_LIBP2P = "libp2p"
PATH_RELAYED = "libp2p-relayed"


def stream_frame_limit(limits: Limits) -> int:
    """``max_frame_bytes`` for the libp2p stream that may carry sealed DATA frames."""
    return HEADER_BYTES + limits.max_frame_bytes + TAG_BYTES + 64


class Carrier(ABC):
    """Moves sealed frames; knows nothing of keys or transfers."""

    path: str

    @abstractmethod
    async def read_frame(self, limits: Limits) -> tuple[FrameType, bytes, memoryview]:
        """Read one frame: (type, header bytes, ciphertext view valid until the next read).

        Raises:
            EndOfStream: the peer closed cleanly between frames.
            ProtocolViolation: bad header, over-limit length (nothing read or allocated for it),
                or the connection ended inside a frame.
            PeerError: the connection broke.
        """

    @abstractmethod
    async def write(self, frame: memoryview | bytes) -> None:
        """Write one whole sealed frame; returns once the transport took it (backpressure).

        Raises:
            PeerError: the connection broke or was closed.
        """

    wakes_on_abort: bool = True
    """Whether :meth:`abort` wakes a pending read (else the reader task must be cancelled)."""

    @abstractmethod
    def abort(self) -> None:
        """Stop both directions now, without waiting: later (and, where ``wakes_on_abort``,
        pending) reads and writes fail. Idempotent."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release the socket or stream once nothing uses it. Idempotent."""

    @property
    @abstractmethod
    def remote(self) -> str:
        """Where the other end is, for logs."""


class SocketCarrier(Carrier):
    """Frames on a connected non-blocking TCP socket, via the loop's ``sock_*`` calls.

    ``abort`` shuts the socket down first, which wakes a pending read or write with an error;
    the file descriptor itself is closed only once no call is using it (closing an fd that a
    pending asyncio call still watches could hit a reused descriptor).
    """

    def __init__(self, sock: socket.socket, limits: Limits, *, path: str = PATH_DIRECT) -> None:
        self.path = path
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        self._header = bytearray(HEADER_BYTES)
        self._buf = memoryview(bytearray(limits.max_frame_bytes + TAG_BYTES))
        self._busy = 0
        self._closing = False
        try:
            peer = sock.getpeername()
            self._remote = f"{peer[0]}:{peer[1]}"
        except OSError:
            self._remote = "?"

    @property
    def remote(self) -> str:
        return self._remote

    async def read_exactly(self, view: memoryview, *, at_boundary: bool = False) -> None:
        if self._closing:
            raise PeerError(f"data connection to {self._remote} is closed")
        got = 0
        self._busy += 1
        try:
            while got < len(view):
                try:
                    n = await self._loop.sock_recv_into(self._sock, view[got:])
                except OSError as exc:
                    raise PeerError(f"data connection to {self._remote} broke: {exc}") from exc
                if n == 0:
                    if at_boundary and got == 0:
                        raise EndOfStream(f"{self._remote} closed the data connection")
                    raise ProtocolViolation(f"data connection from {self._remote} ended inside a frame "
                                            f"({got} of {len(view)} bytes): truncated")
                got += n
        finally:
            self._done()

    async def read_frame(self, limits: Limits) -> tuple[FrameType, bytes, memoryview]:
        await self.read_exactly(memoryview(self._header), at_boundary=True)
        header = bytes(self._header)
        ftype, length = parse_header(header, limits)
        if length > len(self._buf):  # limits grew after this carrier was built: never overrun
            raise ProtocolViolation(f"frame of {length} bytes exceeds this connection's {len(self._buf)}-byte buffer")
        body = self._buf[:length]
        await self.read_exactly(body)
        return ftype, header, body

    async def write(self, frame: memoryview | bytes) -> None:
        if self._closing:
            raise PeerError(f"data connection to {self._remote} is closed")
        self._busy += 1
        try:
            await self._loop.sock_sendall(self._sock, frame)
        except OSError as exc:
            raise PeerError(f"data connection to {self._remote} broke: {exc}") from exc
        finally:
            self._done()

    def abort(self) -> None:
        if not self._closing:
            self._closing = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # never connected or already reset
        self._release_if_idle()

    async def aclose(self) -> None:
        self.abort()

    def _done(self) -> None:
        self._busy -= 1
        self._release_if_idle()

    def _release_if_idle(self) -> None:
        if self._closing and self._busy == 0 and self._sock.fileno() != -1:
            self._sock.close()


class StreamCarrier(Carrier):
    """Frames as msgpack ``bin`` messages on a libp2p stream (direct or relayed connection).

    A pending read is a call into the libp2p thread that only cancellation stops, so the session
    cancels its reader task on abort (``wakes_on_abort`` is False).
    """

    wakes_on_abort = False

    def __init__(self, stream: MessageStream, *, relayed: bool) -> None:
        self._stream = stream
        self.path = PATH_RELAYED if relayed else PATH_LIBP2P
        self._closed = False
        self._reset_done = False

    @property
    def remote(self) -> str:
        return f"{self._stream.peer_id} ({self.path})"

    async def read_frame(self, limits: Limits) -> tuple[FrameType, bytes, memoryview]:
        message = await self._stream.recv()
        if not isinstance(message, bytes) or len(message) < HEADER_BYTES:
            raise ProtocolViolation(f"expected a sealed frame (bytes) on the tensor stream, got {type(message).__name__}")
        header = message[:HEADER_BYTES]
        ftype, length = parse_header(header, limits)
        if len(message) - HEADER_BYTES != length:
            raise ProtocolViolation(f"frame announces {length} bytes, message holds {len(message) - HEADER_BYTES}")
        return ftype, header, memoryview(message)[HEADER_BYTES:]

    async def write(self, frame: memoryview | bytes) -> None:
        if self._closed:
            raise PeerError(f"tensor stream to {self._stream.peer_id} is closed")
        # A copy: the frame crosses to the libp2p thread, and the session reuses its buffer.
        await self._stream.send(bytes(frame))

    def abort(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        self._closed = True
        if self._reset_done:
            return
        self._reset_done = True
        try:
            await self._stream.reset()
        except Exception as exc:  # noqa: BLE001 — the host may already be gone; nothing to undo
            log.debug("resetting tensor stream to %s: %s", self._stream.peer_id, exc)
