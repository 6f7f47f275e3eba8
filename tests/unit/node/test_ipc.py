"""Daemon <-> worker IPC: typed messages round-trip; malformed frames are refused, never built."""

import asyncio

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyphae.node import ipc
from hyphae.protocol.errors import EndOfStream, ProtocolViolation
from hyphae.protocol.wire import decode_body


def roundtrip(message: ipc.Message) -> ipc.Message:
    frame = ipc.encode(message)
    return ipc.decode(decode_body(frame[4:]))


def test_every_message_type_round_trips() -> None:
    refs = [ipc.TensorRef("w", "bfloat16", (2, 3), 0, 12)]
    for message in (
        ipc.WorkerHello(index=0, pid=42),
        ipc.Call(id=7, method="all_reduce", args={"group": ["a"], "tag": "t", "timeout_s": 5.0, "op": "mean"},
                 shm="seg", tensors=refs),
        ipc.Reply(id=7, result={"included": ["a"]}, shm="s2", tensors=refs),
        ipc.Reply(id=8, error={"kind": "PeerUnavailable", "message": "gone", "peer": "b"}),
        ipc.Progress(kind="log", step=10, tokens=100, elapsed_s=1.5, loss=2.5, tokens_per_s=66.0),
        ipc.Release(shm="s2"),
        ipc.Stop(reason="bye"),
    ):
        assert roundtrip(message) == message


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"t": "nope"}, "unknown IPC message"),
        ({"t": "stop", "reason": "x", "extra": 1}, "unknown fields"),
        ({"t": "stop"}, "Stop"),
        ({"t": "hello", "index": "0", "pid": 1}, "index must be int"),
        ({"t": "call", "id": 1, "method": "m", "args": {}, "tensors": [["a", "float32", [-1], 0, 4]]}, "malformed"),
        ({"t": "release", "shm": 5}, "shm must be str"),
    ],
)
def test_malformed_messages_are_refused(body: dict, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        ipc.decode(body)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=8), st.none()), max_size=6))
def test_random_maps_never_crash_the_decoder(body: dict) -> None:
    body.setdefault("t", "call")
    try:
        ipc.decode(body)
    except ProtocolViolation:
        pass


async def test_recv_reports_clean_eof_and_truncation() -> None:
    reader = asyncio.StreamReader()
    reader.feed_eof()
    with pytest.raises(EndOfStream):
        await ipc.recv(reader)
    reader = asyncio.StreamReader()
    reader.feed_data(ipc.encode(ipc.Stop(reason="x"))[:-2])
    reader.feed_eof()
    with pytest.raises(ProtocolViolation, match="inside a frame"):
        await ipc.recv(reader)
    reader = asyncio.StreamReader()
    reader.feed_data((64 << 20).to_bytes(4, "big"))
    with pytest.raises(ProtocolViolation, match="limit"):
        await ipc.recv(reader)
    body = msgpack.packb({"t": "stop", "reason": "ok"})
    reader = asyncio.StreamReader()
    reader.feed_data(len(body).to_bytes(4, "big") + body)
    assert await ipc.recv(reader) == ipc.Stop(reason="ok")


async def test_peer_credentials_are_the_kernels_view_of_who_connected() -> None:
    import os
    import socket

    left, right = socket.socketpair()
    reader, writer = await asyncio.open_unix_connection(sock=left)
    try:
        assert ipc.peer_credentials(writer) == (os.getpid(), os.getuid(), os.getgid())
    finally:
        writer.close()
        right.close()
