"""Framed message streams over libp2p: the trio half and the asyncio half.

:class:`TrioFramedStream` lives in the libp2p thread and does the byte work (read exactly, check
the length prefix, decode), so a malformed or oversized frame is stopped there. The daemon only
sees :class:`MessageStream`, whose calls cross the bridge once per message (or once per
request/response pair with :meth:`MessageStream.request`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from libp2p.exceptions import BaseLibp2pError

from . import _libp2p_guard
from .errors import EndOfStream, PeerError, ProtocolViolation
from .wire import DEFAULT_MAX_FRAME_BYTES, HEADER_BYTES, decode_body, encode_frame, parse_header

if TYPE_CHECKING:
    from libp2p.abc import INetStream

    from ._bridge import TrioThread

__all__ = ["TrioFramedStream", "MessageStream"]

log = logging.getLogger(__name__)

# Every libp2p host in hyphae is built by a module that imports this one, so installing here
# guarantees no host runs without it: a handler that raises (py-libp2p's gossipsub on garbage)
# resets its stream instead of ending the host. See _libp2p_guard.
_libp2p_guard.install()


@contextlib.contextmanager
def libp2p_errors_as_peer_errors(what: str) -> Iterator[None]:
    """Turn the many ways a libp2p stream can break into one :class:`PeerError`."""
    try:
        yield
    except (BaseLibp2pError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
        raise PeerError(f"{what}: {type(exc).__name__}: {exc}") from exc


class TrioFramedStream:
    """Length-prefixed msgpack frames over one libp2p stream (trio side)."""

    def __init__(self, stream: INetStream, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self._stream = stream
        self._buf = bytearray()
        self.max_frame_bytes = max_frame_bytes
        self.peer_id = str(stream.muxed_conn.peer_id)
        self.protocol = str(stream.get_protocol() or "")
        self._closed = False

    async def _fill(self, n: int, *, at_boundary: bool) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = await self._stream.read(max(n - len(self._buf), 65536))
            except EOFError:  # libp2p's StreamEOF and MuxedStreamEOF both derive from it
                chunk = b""
            except (BaseLibp2pError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise PeerError(f"read failed: {type(exc).__name__}: {exc}") from exc
            if not chunk:
                if at_boundary and not self._buf:
                    raise EndOfStream("peer closed the stream")
                raise ProtocolViolation(f"stream ended inside a frame ({len(self._buf)} of {n} bytes)")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def recv(self) -> Any:
        """Read one message.

        Raises:
            EndOfStream: the peer closed the stream between frames.
            ProtocolViolation: oversized, truncated or malformed frame (nothing was allocated for
                an oversized one).
            PeerError: the stream broke.
        """
        header = await self._fill(HEADER_BYTES, at_boundary=True)
        length = parse_header(header, self.max_frame_bytes)
        return decode_body(await self._fill(length, at_boundary=False))

    async def send(self, message: Any) -> None:
        frame = encode_frame(message)
        with libp2p_errors_as_peer_errors("write failed"):
            await self._stream.write(frame)

    async def request(self, message: Any) -> Any:
        await self.send(message)
        return await self.recv()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            await self._stream.close()

    async def reset(self) -> None:
        """Abort the stream (both directions); used after a protocol violation."""
        self._closed = True
        with contextlib.suppress(Exception):
            await self._stream.reset()


class MessageStream:
    """The asyncio face of a :class:`TrioFramedStream`.

    Each call crosses into the libp2p thread once. Cancelling a call cancels the read or write in
    progress; the stream should then be closed, as a frame may be half written.
    """

    def __init__(self, inner: TrioFramedStream, bridge: TrioThread) -> None:
        self._inner = inner
        self._bridge = bridge
        self.peer_id = inner.peer_id
        self.protocol = inner.protocol

    async def send(self, message: Any) -> None:
        await self._bridge.run(self._inner.send, message)

    async def recv(self) -> Any:
        return await self._bridge.run(self._inner.recv)

    async def request(self, message: Any) -> Any:
        """Send ``message`` and wait for one reply, in a single crossing."""
        return await self._bridge.run(self._inner.request, message)

    async def aclose(self) -> None:
        await self._bridge.run(self._inner.close)

    async def reset(self) -> None:
        await self._bridge.run(self._inner.reset)

    def __aiter__(self) -> MessageStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.recv()
        except EndOfStream:
            raise StopAsyncIteration from None
