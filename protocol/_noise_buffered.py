"""Buffered Noise transport I/O for the yamux muxer: the same bytes on the wire, fewer passes.

Why: py-libp2p's Noise session reads each Noise message with two socket reads (the 2-byte length,
then the body), each behind a ``trio.Lock`` in ``TrioTCPStream`` (every acquisition is a
scheduler pass), and trio's own socket calls add a pass after every successful send or receive.
Once the muxer owns the connection it is the only reader and, behind its send lock, the only
writer, so :class:`NoiseChunkIO` works on the socket's file descriptor directly:

* ``read()`` takes up to 64 KiB per ``read(2)`` and decrypts every complete ``len(2) | ciphertext``
  message in it, returning their plaintexts joined; it waits (``wait_readable``) only when the
  socket is empty, and yields every ``_YIELD_EVERY`` reads that did not wait, so a busy
  connection cannot starve the other tasks;
* ``write(data)`` encrypts in messages of at most 65519 plaintext bytes (as py-libp2p and
  go-libp2p do) and writes them with as few ``write(2)`` calls as the socket takes, waiting only
  when the socket buffer is full.

Measured (bench/muxer.py, both sides LeanYamux, 2 shared cores): small-message round trip
375 -> 220 us median and 194 -> 114 us of CPU per message per side against py-libp2p's session
read/write; one-way bulk 203 -> 413 MB/s.

Writes are atomic: a Noise nonce is spent when a message is encrypted, so a write abandoned
half-way (or before sending) corrupts the connection for every stream on it. Hence a write that
has to wait is shielded from cancellation, but gives up after ``WRITE_TIMEOUT_S`` (go-yamux's
ConnectionWriteTimeout) by raising ``trio.BrokenResourceError``; the muxer then closes the
connection. Encryption and decryption are the session's own (``NoiseTransportReadWriter``), so
nonces and wire bytes are what the stock session would produce. Where the session is not the
expected SecureSession / Noise / RawConnection / TrioTCPStream stack (another security transport,
a relayed or WebSocket connection, Windows), :func:`open_chunk_io` uses the session's own
``read()`` / ``write()``, with the same atomic-write rule.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import trio
from libp2p.abc import ISecureConn
from libp2p.io.trio import TrioTCPStream
from libp2p.network.connection.raw_connection import RawConnection
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter
from libp2p.security.secure_session import SecureSession

__all__ = ["NoiseChunkIO", "open_chunk_io", "WRITE_TIMEOUT_S"]

log = logging.getLogger(__name__)

RECEIVE_BYTES = 64 * 1024
WRITE_TIMEOUT_S = 10.0
_YIELD_EVERY = 32  # reads in a row that found data before the reader yields anyway
_DIRECT_FD = os.name == "posix"  # read(2)/write(2) work on sockets there

Read = Callable[[], Awaitable[bytes]]
Write = Callable[[bytes], Awaitable[None]]


class NoiseChunkIO:
    """Noise transport messages on the socket's fd; one reader task and one writer at a time.

    Args:
        session: the secured session (only its already-decrypted leftover bytes are read from it).
        noise: the session's transport read-writer (owns the cipher states and nonces).
        sock: the trio socket under the session.
    """

    def __init__(self, session: SecureSession, noise: NoiseTransportReadWriter, sock: trio.socket.SocketType) -> None:
        self._session: SecureSession | None = session
        self._encrypt = noise.encrypt
        self._decrypt = noise.decrypt
        self._sock = sock
        self._buf = bytearray()
        self._reads_without_wait = 0

    async def read(self) -> bytes:
        """The plaintext of every complete Noise message available (waits for at least one).

        Returns b"" at a clean end of the connection. Raises ``ValueError`` when the connection
        ends inside a message; trio's and the OS's errors, and the cipher's authentication error,
        pass through (the muxer treats any exception as the connection being gone).
        """
        if self._session is not None:
            session, self._session = self._session, None
            if session.low_watermark != session.high_watermark:  # decrypted during negotiation
                return await session.read()
        buf = self._buf
        while True:
            received = await self._receive()
            if not received:
                if buf:
                    raise ValueError(f"connection ended inside a Noise message ({len(buf)} bytes buffered)")
                return b""
            buf += received
            plain = self._decrypt_complete(buf)
            if plain:
                return plain

    async def _receive(self) -> bytes:
        sock = self._sock
        while True:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the connection's socket was closed")
            try:
                data = os.read(fd, RECEIVE_BYTES)
            except BlockingIOError:
                self._reads_without_wait = 0
                await trio.lowlevel.wait_readable(sock)
                continue
            self._reads_without_wait += 1
            if self._reads_without_wait >= _YIELD_EVERY:
                self._reads_without_wait = 0
                await trio.lowlevel.checkpoint()
            return data

    def _decrypt_complete(self, buf: bytearray) -> bytes:
        plain: list[bytes] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            size = (buf[pos] << 8) | buf[pos + 1]
            start = pos + 2
            if end - start < size:
                break
            plain.append(self._decrypt(bytes(buf[start:start + size])))
            pos = start + size
        if pos:
            del buf[:pos]
        return plain[0] if len(plain) == 1 else b"".join(plain)

    async def write(self, data: bytes) -> None:
        """Encrypt ``data`` into as many Noise messages as it needs and write them all (atomic)."""
        if len(data) <= MAX_PLAINTEXT_LENGTH:
            cipher = self._encrypt(data)
            wire = len(cipher).to_bytes(2, "big") + cipher
        else:
            view = memoryview(data)
            parts: list[bytes] = []
            for start in range(0, len(view), MAX_PLAINTEXT_LENGTH):
                cipher = self._encrypt(bytes(view[start:start + MAX_PLAINTEXT_LENGTH]))
                parts += (len(cipher).to_bytes(2, "big"), cipher)
            wire = b"".join(parts)
        rest = memoryview(wire)
        sock = self._sock
        while rest:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the connection's socket was closed")
            try:
                rest = rest[os.write(fd, rest):]
            except BlockingIOError:
                await _atomic(trio.lowlevel.wait_writable(sock))


async def _atomic(wait: Awaitable[None]) -> None:
    """Await ``wait`` shielded from cancellation, but for at most WRITE_TIMEOUT_S."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + WRITE_TIMEOUT_S) as scope:
        await wait
    if scope.cancelled_caught:
        raise trio.BrokenResourceError(f"write made no progress for {WRITE_TIMEOUT_S} s")


def open_chunk_io(conn: ISecureConn, *, direct: bool = True) -> tuple[Read, Write]:
    """The (read, write) pair the muxer uses on ``conn``: direct Noise I/O where the stack allows
    (and ``direct``; bench/muxer.py turns it off to measure what it buys).

    ``read()`` returns the next plaintext bytes available (b"" at EOF); ``write(data)`` sends all
    of ``data`` or raises, and cannot be cancelled half-way (see the module docstring). Call once,
    when the muxer takes the connection over; nothing else may read or write it afterwards.
    """
    noise = getattr(conn, "conn", None)
    raw = getattr(getattr(noise, "read_writer", None), "read_write_closer", None)
    tcp = getattr(raw, "stream", None)
    stream = getattr(tcp, "stream", None)
    if (direct and _DIRECT_FD and isinstance(conn, SecureSession) and isinstance(noise, NoiseTransportReadWriter)
            and isinstance(raw, RawConnection) and isinstance(tcp, TrioTCPStream)
            and isinstance(stream, trio.SocketStream)):
        fast = NoiseChunkIO(conn, noise, stream.socket)
        return fast.read, fast.write
    log.debug("no direct Noise I/O for %s; using the session's read/write", type(conn).__name__)

    async def write(data: bytes) -> None:
        await _atomic(conn.write(data))

    return conn.read, write
