"""LeanYamux on in-memory connections: the exact frames it sends, flow control, FIN/RST, pings,
GO_AWAY, protocol errors, connection loss, and random garbage fed to its frame parser.

Every test is a sync function running ``trio.run`` under ``trio.fail_after``: a hang fails.
Interop with py-libp2p's own Yamux over real TCP + Noise is in
tests/integration/test_yamux_interop.py.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from libp2p.abc import ConnectionType
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import (
    MuxedConnUnavailable,
    MuxedStreamClosed,
    MuxedStreamEOF,
    MuxedStreamReset,
)

from hyphae.protocol._yamux import (
    ACCEPT_BACKLOG,
    FLAG_ACK,
    FLAG_FIN,
    FLAG_RST,
    FLAG_SYN,
    GO_AWAY_NORMAL,
    GO_AWAY_PROTOCOL_ERROR,
    INITIAL_WINDOW,
    MAX_BUFFERED_BYTES,
    MAX_DATA_PAYLOAD,
    TYPE_DATA,
    TYPE_GO_AWAY,
    TYPE_PING,
    TYPE_WINDOW_UPDATE,
    UNADMITTED_BUFFER_BYTES,
    UNADMITTED_MAX_INBOUND_STREAMS,
    UNADMITTED_STREAM_BYTES,
    LeanYamux,
)

HEADER = struct.Struct(">BBHII")
PEER = ID(b"\x00\x04test")
TIMEOUT_S = 10


class MemorySecureConn:
    """The slice of ISecureConn the muxer uses, over one end of a trio memory stream pair."""

    def __init__(self, stream: trio.abc.Stream, *, initiator: bool) -> None:
        self.stream = stream
        self.is_initiator = initiator
        self.closed = False

    async def read(self, n: int | None = None) -> bytes:
        try:
            return await self.stream.receive_some(n)
        except trio.ClosedResourceError:
            return b""

    async def write(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close(self) -> None:
        self.closed = True
        await self.stream.aclose()

    def get_remote_address(self) -> tuple[str, int] | None:
        return ("127.0.0.1", 4001)

    def get_transport_addresses(self) -> list[Any]:
        return []

    def get_connection_type(self) -> ConnectionType:
        return ConnectionType.DIRECT


class RawPeer:
    """The test's side of a connection: writes raw frames, reads and parses what the muxer sent."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def send(self, kind: int, flags: int, stream_id: int, length: int, payload: bytes = b"") -> None:
        await self.stream.send_all(HEADER.pack(0, kind, flags, stream_id, length) + payload)

    async def frame(self) -> tuple[int, int, int, int, bytes]:
        """The next frame: (type, flags, stream id, length, payload). Raises EOFError at the end."""
        while True:
            if len(self.buf) >= 12:
                _, kind, flags, sid, length = HEADER.unpack_from(self.buf)
                size = 12 + (length if kind == TYPE_DATA else 0)
                if len(self.buf) >= size:
                    payload = bytes(self.buf[12:size])
                    del self.buf[:size]
                    return kind, flags, sid, length, payload
            try:
                chunk = await self.stream.receive_some()
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                chunk = b""
            if not chunk:
                raise EOFError("muxer closed the connection")
            self.buf += chunk

    async def until_closed(self) -> list[tuple[int, int, int, int, bytes]]:
        frames = []
        while True:
            try:
                frames.append(await self.frame())
            except EOFError:
                return frames


def run(test: Callable[..., Awaitable[None]], *args: Any) -> None:
    async def main() -> None:
        with trio.fail_after(TIMEOUT_S):
            await test(*args)

    trio.run(main)


async def muxer_and_raw(nursery: trio.Nursery, *, initiator: bool = True,
                        admitted: bool = True) -> tuple[LeanYamux, RawPeer]:
    """A muxer and the raw peer on its other end; ``admitted``: as after the peer's hello."""
    ours, theirs = trio.testing.memory_stream_pair()
    mux = LeanYamux(MemorySecureConn(ours, initiator=initiator), PEER)  # type: ignore[arg-type]
    if admitted:
        mux.admit()
    nursery.start_soon(mux.start)
    await mux.event_started.wait()
    return mux, RawPeer(theirs)


async def muxer_pair(nursery: trio.Nursery) -> tuple[LeanYamux, LeanYamux]:
    left, right = trio.testing.memory_stream_pair()
    a = LeanYamux(MemorySecureConn(left, initiator=True), PEER)  # type: ignore[arg-type]
    b = LeanYamux(MemorySecureConn(right, initiator=False), PEER)  # type: ignore[arg-type]
    a.admit()
    b.admit()
    nursery.start_soon(a.start)
    nursery.start_soon(b.start)
    await a.event_started.wait()
    await b.event_started.wait()
    return a, b


# ---- the frames on the wire --------------------------------------------------------------------


def test_open_sends_syn_with_first_data_and_accept_acks_with_first_reply() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            stream = await mux.open_stream()
            assert stream.stream_id == 1 and (await mux.open_stream()).stream_id == 3  # client: odd
            await stream.write(b"hello")
            assert await raw.frame() == (TYPE_DATA, FLAG_SYN, 1, 5, b"hello")
            await stream.write(b"again")
            assert await raw.frame() == (TYPE_DATA, 0, 1, 5, b"again")

            await raw.send(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0)  # the peer opens stream 2 (even)
            inbound = await mux.accept_stream()
            assert inbound.stream_id == 2
            await inbound.write(b"yo")
            assert await raw.frame() == (TYPE_DATA, FLAG_ACK, 2, 2, b"yo")
            nursery.cancel_scope.cancel()

    run(body)


def test_reading_a_fresh_stream_announces_it_first() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            stream = await mux.open_stream()
            nursery.start_soon(stream.read)
            assert await raw.frame() == (TYPE_WINDOW_UPDATE, FLAG_SYN, 1, 0, b"")
            nursery.cancel_scope.cancel()

    run(body)


def test_fin_and_rst_never_share_a_frame_with_ack() -> None:
    """py-libp2p's Yamux ignores FIN/RST on a frame carrying ACK; the ACK goes separately."""

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            await raw.send(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0)
            await raw.send(TYPE_WINDOW_UPDATE, FLAG_SYN, 4, 0)
            first, second = await mux.accept_stream(), await mux.accept_stream()
            await first.close()
            assert await raw.frame() == (TYPE_WINDOW_UPDATE, FLAG_ACK, 2, 0, b"")
            assert await raw.frame() == (TYPE_WINDOW_UPDATE, FLAG_FIN, 2, 0, b"")
            await second.reset()
            assert await raw.frame() == (TYPE_WINDOW_UPDATE, FLAG_ACK, 4, 0, b"")
            assert await raw.frame() == (TYPE_WINDOW_UPDATE, FLAG_RST, 4, 0, b"")
            nursery.cancel_scope.cancel()

    run(body)


def test_resetting_a_stream_the_peer_never_saw_sends_nothing() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            await (await mux.open_stream()).reset()
            await (await mux.open_stream()).write(b"x")
            assert await raw.frame() == (TYPE_DATA, FLAG_SYN, 3, 1, b"x")
            nursery.cancel_scope.cancel()

    run(body)


def test_ping_syn_is_answered_with_ack_echoing_the_opaque_value() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            await raw.send(TYPE_PING, FLAG_SYN, 0, 0xDEADBEEF)
            assert await raw.frame() == (TYPE_PING, FLAG_ACK, 0, 0xDEADBEEF, b"")
            nursery.cancel_scope.cancel()

    run(body)


def test_close_sends_go_away_and_ends_everything() -> None:
    async def body() -> None:
        closed = []

        async def on_close() -> None:
            closed.append(True)

        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            mux.on_close = on_close
            stream = await mux.open_stream()
            await mux.close()
            await mux.close()  # idempotent
            assert await raw.until_closed() == [(TYPE_GO_AWAY, 0, 0, GO_AWAY_NORMAL, b"")]
            assert mux.is_closed and not mux.is_established and closed == [True]
            with pytest.raises(MuxedStreamReset):
                await stream.read()
            with pytest.raises(MuxedStreamReset):
                await stream.write(b"x")
            with pytest.raises(MuxedConnUnavailable):
                await mux.open_stream()
            with pytest.raises(MuxedConnUnavailable):
                await mux.accept_stream()

    run(body)


# ---- streams between two LeanYamux ------------------------------------------------------------------


def test_half_close_lets_the_other_side_reply_and_then_see_eof() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            a, b = await muxer_pair(nursery)
            out = await a.open_stream()
            await out.write(b"question")
            await out.close()
            with pytest.raises(MuxedStreamClosed):
                await out.write(b"more")
            inbound = await b.accept_stream()
            assert await inbound.read() == b"question"
            with pytest.raises(MuxedStreamEOF):
                await inbound.read()
            await inbound.write(b"answer")
            await inbound.close()
            assert await out.read() == b"answer"
            with pytest.raises(MuxedStreamEOF):
                await out.read()
            assert out.is_closed and inbound.is_closed and not a._streams and not b._streams
            nursery.cancel_scope.cancel()

    run(body)


def test_reset_reaches_the_peer_reader_and_writer() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            a, b = await muxer_pair(nursery)
            out = await a.open_stream()
            await out.write(b"x")
            inbound = await b.accept_stream()
            assert await inbound.read() == b"x"
            await out.reset()
            with pytest.raises(MuxedStreamReset):
                await inbound.read()
            with pytest.raises(MuxedStreamReset):
                await inbound.write(b"y")
            with pytest.raises(MuxedStreamReset):
                await out.read()
            nursery.cancel_scope.cancel()

    run(body)


def test_writer_blocks_at_the_window_and_resumes_as_the_reader_consumes() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            a, b = await muxer_pair(nursery)
            out = await a.open_stream()
            payload = bytes(range(256)) * (4 * INITIAL_WINDOW // 256)  # 4 windows
            done = trio.Event()

            async def write_all() -> None:
                await out.write(payload)
                done.set()

            nursery.start_soon(write_all)
            inbound = await b.accept_stream()
            await trio.sleep(0.2)
            assert not done.is_set() and out._send_window == 0  # exhausted, parked
            assert len(inbound._rbuf) == INITIAL_WINDOW  # exactly one window in flight
            received = bytearray()
            while len(received) < len(payload):
                received += await inbound.read(7000)
            await done.wait()
            assert received == payload
            nursery.cancel_scope.cancel()

    run(body)


def test_credit_is_returned_in_one_update_at_half_the_window() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            chunk = b"z" * 1000
            await raw.send(TYPE_DATA, FLAG_SYN, 2, len(chunk), chunk)
            stream = await mux.accept_stream()
            for _ in range(INITIAL_WINDOW // 2 // 1000 + 1):
                await stream.read()
                await raw.send(TYPE_DATA, 0, 2, len(chunk), chunk)
            kind, flags, sid, delta, _ = await raw.frame()
            assert (kind, flags, sid) == (TYPE_WINDOW_UPDATE, FLAG_ACK, 2)
            assert delta == (INITIAL_WINDOW // 2 // 1000 + 1) * 1000  # the first read past half
            nursery.cancel_scope.cancel()

    run(body)


def test_large_write_is_split_into_frames_that_fit_one_noise_message() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            await (await mux.open_stream()).write(b"q" * (MAX_DATA_PAYLOAD + 10))
            assert (await raw.frame())[3] == MAX_DATA_PAYLOAD and (await raw.frame())[3] == 10
            assert MAX_DATA_PAYLOAD + 12 <= 65535 - 16
            nursery.cancel_scope.cancel()

    run(body)


def test_many_concurrent_streams_stay_separate() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            a, b = await muxer_pair(nursery)

            async def serve() -> None:
                while True:
                    stream = await b.accept_stream()

                    async def echo(s: Any = stream) -> None:
                        while True:
                            try:
                                data = await s.read()
                            except MuxedStreamEOF:
                                await s.close()
                                return
                            await s.write(data)

                    nursery.start_soon(echo)

            nursery.start_soon(serve)

            async def client(i: int) -> None:
                s = await a.open_stream()
                for j in range(20):
                    msg = f"{i}:{j}".encode()
                    await s.write(msg)
                    got = b""
                    while len(got) < len(msg):
                        got += await s.read(len(msg) - len(got))
                    assert got == msg
                await s.close()
                with pytest.raises(MuxedStreamEOF):
                    await s.read()

            async with trio.open_nursery() as clients:
                for i in range(100):
                    clients.start_soon(client, i)
            nursery.cancel_scope.cancel()

    run(body)


def test_cancelled_read_loses_no_data() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            a, b = await muxer_pair(nursery)
            out = await a.open_stream()
            await out.write(b"1")
            inbound = await b.accept_stream()
            assert await inbound.read() == b"1"
            with trio.move_on_after(0.05):
                await inbound.read()
            await out.write(b"2")
            assert await inbound.read() == b"2"
            nursery.cancel_scope.cancel()

    run(body)


def test_connection_loss_fails_readers_writers_and_accept_without_hanging() -> None:
    async def body() -> None:
        closes = []

        async def on_close() -> None:
            closes.append(True)

        async with trio.open_nursery() as nursery:
            a, b = await muxer_pair(nursery)
            b.on_close = on_close
            finished = []
            out = await a.open_stream()
            await out.write(b"x")
            inbound = await b.accept_stream()  # nobody reads it: out's writer will park on window
            waiting = await b.open_stream()
            await waiting.write(b"w")
            waiting_out = await a.accept_stream()
            assert await waiting_out.read() == b"w"
            half = await a.open_stream()
            await half.write(b"tail")
            await half.close()
            half_in = await b.accept_stream()

            async def expect(exc: type[Exception], fn: Callable[[], Awaitable[Any]]) -> None:
                with pytest.raises(exc):
                    await fn()
                finished.append(exc)

            nursery.start_soon(expect, MuxedStreamReset, waiting_out.read)
            nursery.start_soon(expect, MuxedStreamReset, lambda: out.write(b"y" * (4 * INITIAL_WINDOW)))
            nursery.start_soon(expect, MuxedConnUnavailable, b.accept_stream)
            await trio.sleep(0.1)
            assert out._send_window == 0 and not finished
            await a.secured_conn.close()  # the transport dies under both muxers
            await b.event_closed.wait()
            await a.event_closed.wait()
            await trio.sleep(0.05)
            assert len(finished) == 3 and closes == [True]
            assert await half_in.read() == b"tail"  # the FIN had arrived: data, then a clean EOF
            with pytest.raises(MuxedStreamEOF):
                await half_in.read()

    run(body)


def test_accept_backlog_is_bounded_by_refusing_with_rst() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            for i in range(ACCEPT_BACKLOG + 1):
                await raw.send(TYPE_WINDOW_UPDATE, FLAG_SYN, 2 * (i + 1), 0)
            refused = 2 * (ACCEPT_BACKLOG + 1)
            assert await raw.frame() == (TYPE_WINDOW_UPDATE, FLAG_RST, refused, 0, b"")
            assert (await mux.accept_stream()).stream_id == 2
            nursery.cancel_scope.cancel()

    run(body)


# ---- budgets ------------------------------------------------------------------------------------


async def _open_and_fill(raw: RawPeer, stream_id: int, nbytes: int) -> None:
    """As a peer that writes without anyone reading: SYN, then ``nbytes`` in full frames."""
    await raw.send(TYPE_WINDOW_UPDATE, FLAG_SYN, stream_id, 0)
    while nbytes > 0:
        size = min(nbytes, MAX_DATA_PAYLOAD)
        await raw.send(TYPE_DATA, 0, stream_id, size, b"x" * size)
        nbytes -= size


def test_before_hello_a_peer_gets_a_few_inbound_streams_and_the_rest_are_refused() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery, admitted=False)
            for i in range(UNADMITTED_MAX_INBOUND_STREAMS + 3):
                await raw.send(TYPE_WINDOW_UPDATE, FLAG_SYN, 2 * (i + 1), 0)
            refused = [2 * (UNADMITTED_MAX_INBOUND_STREAMS + i + 1) for i in range(3)]
            # each RST goes out from its own task: in any order
            assert sorted([(await raw.frame())[:3] for _ in refused]) == [(TYPE_WINDOW_UPDATE, FLAG_RST, s) for s in refused]
            assert mux.streams_refused == 3
            mux.admit()  # after hello the same peer may open more
            await raw.send(TYPE_WINDOW_UPDATE, FLAG_SYN, 1000, 0)
            for _ in range(UNADMITTED_MAX_INBOUND_STREAMS):
                await mux.accept_stream()
            assert (await mux.accept_stream()).stream_id == 1000
            nursery.cancel_scope.cancel()

    run(body)


def test_before_hello_a_stream_holding_too_many_unread_bytes_is_reset_and_the_rest_go_on() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery, admitted=False)
            await _open_and_fill(raw, 2, UNADMITTED_STREAM_BYTES)  # exactly the limit: kept
            await _open_and_fill(raw, 4, UNADMITTED_STREAM_BYTES + 1)  # one byte over: reset
            assert await raw.frame() == (TYPE_WINDOW_UPDATE, FLAG_RST, 4, 0, b"")
            kept, dropped = await mux.accept_stream(), await mux.accept_stream()
            assert mux.buffered_bytes == UNADMITTED_STREAM_BYTES
            with pytest.raises(MuxedStreamReset):
                await dropped.read()
            assert len(await kept.read()) == UNADMITTED_STREAM_BYTES
            assert mux.buffered_bytes == 0 and mux.streams_refused == 1
            nursery.cancel_scope.cancel()

    run(body)


def test_before_hello_a_connection_holds_at_most_its_small_buffer_over_all_streams() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery, admitted=False)
            per_stream = UNADMITTED_STREAM_BYTES
            fits = UNADMITTED_BUFFER_BYTES // per_stream
            for i in range(fits + 2):
                await _open_and_fill(raw, 2 * (i + 1), per_stream)
            resets = sorted([(await raw.frame())[:3] for _ in range(2)])  # sent from a task each: any order
            assert resets == [(TYPE_WINDOW_UPDATE, FLAG_RST, 2 * (fits + i + 1)) for i in range(2)]
            assert mux.buffered_bytes == UNADMITTED_BUFFER_BYTES
            nursery.cancel_scope.cancel()

    run(body)


def test_an_admitted_connection_resets_the_stream_that_would_go_over_its_buffer_budget() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            fits = MAX_BUFFERED_BYTES // INITIAL_WINDOW
            for i in range(fits + 1):
                await _open_and_fill(raw, 2 * (i + 1), INITIAL_WINDOW)
            assert (await raw.frame())[:3] == (TYPE_WINDOW_UPDATE, FLAG_RST, 2 * (fits + 1))
            assert mux.buffered_bytes == MAX_BUFFERED_BYTES
            streams = [await mux.accept_stream() for _ in range(fits)]
            for stream in streams[:10]:
                await stream.reset()
            assert mux.buffered_bytes == MAX_BUFFERED_BYTES - 10 * INITIAL_WINDOW  # a reset frees its bytes
            nursery.cancel_scope.cancel()

    run(body)


def test_frames_for_unknown_streams_are_ignored() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            await raw.send(TYPE_DATA, 0, 40, 3, b"abc")
            await raw.send(TYPE_WINDOW_UPDATE, FLAG_FIN, 42, 100)
            await raw.send(TYPE_PING, FLAG_SYN, 0, 7)
            assert await raw.frame() == (TYPE_PING, FLAG_ACK, 0, 7, b"")
            assert mux.is_established
            nursery.cancel_scope.cancel()

    run(body)


# ---- protocol errors and garbage -------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames",
    [
        pytest.param([(TYPE_DATA, FLAG_SYN, 2, INITIAL_WINDOW + 1)], id="data-over-any-window"),
        pytest.param([(TYPE_DATA, FLAG_SYN, 2, 1000), (TYPE_DATA, 0, 2, INITIAL_WINDOW)], id="data-over-granted"),
        pytest.param([(TYPE_WINDOW_UPDATE, FLAG_SYN, 3, 0)], id="syn-with-our-parity"),
        pytest.param([(TYPE_WINDOW_UPDATE, FLAG_SYN, 0, 0)], id="syn-on-stream-0"),
        pytest.param([(TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0), (TYPE_WINDOW_UPDATE, FLAG_SYN, 2, 0)], id="dup-syn"),
        pytest.param([(7, 0, 0, 0)], id="unknown-type"),
    ],
)
def test_protocol_error_sends_go_away_and_closes(frames: list[tuple[int, int, int, int]]) -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            for kind, flags, sid, length in frames:
                payload = b"p" * length if kind == TYPE_DATA and length <= INITIAL_WINDOW else b""
                await raw.send(kind, flags, sid, length, payload)
            sent = await raw.until_closed()
            assert sent[-1] == (TYPE_GO_AWAY, 0, 0, GO_AWAY_PROTOCOL_ERROR, b"")
            await mux.event_closed.wait()
            assert "protocol error" in str(mux._dead)

    run(body)


def test_bad_version_closes_the_connection() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            await raw.stream.send_all(struct.pack(">BBHII", 1, TYPE_PING, FLAG_SYN, 0, 1))
            assert (await raw.until_closed())[-1][:2] == (TYPE_GO_AWAY, 0)
            await mux.event_closed.wait()

    run(body)


def test_peer_go_away_ends_the_connection() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery)
            stream = await mux.open_stream()
            await raw.send(TYPE_GO_AWAY, 0, 0, GO_AWAY_NORMAL)
            await mux.event_closed.wait()
            with pytest.raises(MuxedStreamReset):
                await stream.read()
            with pytest.raises(MuxedConnUnavailable):
                await mux.open_stream()

    run(body)


_frame = st.tuples(
    st.sampled_from([0, 0, 0, 1]),  # version: mostly valid
    st.integers(0, 4),  # type
    st.integers(0, 15),  # flags
    st.integers(0, 8),  # stream id
    st.one_of(st.integers(0, 64), st.integers(0, 2**32 - 1)),  # length
    st.binary(max_size=64),  # whatever follows
).map(lambda f: HEADER.pack(*f[:5]) + f[5])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.one_of(st.binary(max_size=80), _frame), max_size=12))
def test_random_bytes_never_crash_or_hang_the_muxer(chunks: list[bytes]) -> None:
    """Whatever arrives, the muxer either keeps running or ends cleanly, and close() ends it."""

    async def body() -> None:
        async with trio.open_nursery() as nursery:
            mux, raw = await muxer_and_raw(nursery, initiator=bool(len(chunks) % 2))

            async def drain() -> None:
                await raw.until_closed()

            nursery.start_soon(drain)

            async def accept_all() -> None:
                while True:
                    try:
                        stream = await mux.accept_stream()
                    except MuxedConnUnavailable:
                        return
                    nursery.start_soon(read_all, stream)

            async def read_all(stream: Any) -> None:
                with contextlib.suppress(MuxedStreamEOF, MuxedStreamReset):
                    while True:
                        await stream.read()

            nursery.start_soon(accept_all)
            for chunk in chunks:
                try:
                    await raw.stream.send_all(chunk)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    break
                await trio.sleep(0)
            await mux.close()
            await mux.event_closed.wait()
            with pytest.raises(MuxedConnUnavailable):
                await mux.open_stream()
            nursery.cancel_scope.cancel()

    run(body)
