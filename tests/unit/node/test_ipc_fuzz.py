"""Daemon <-> worker IPC under hostile input: whatever bytes a confused or compromised worker
writes, the daemon gets a typed, schema-checked message or a ProtocolViolation — never a crash, a
hang, or an allocation sized by an unchecked number."""

import asyncio

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyphae.node import ipc
from hyphae.protocol.errors import EndOfStream, ProtocolViolation

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=12)
    | st.binary(max_size=24),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
refs = st.lists(st.one_of(plain, st.tuples(st.text(max_size=6), st.sampled_from([*ipc.DTYPE_BYTES, "f8", ""]),
                                            st.lists(st.integers(-2, 2**41), max_size=9), st.integers(-1, 2**41),
                                            st.integers(-1, 2**41)).map(list)), max_size=4)
calls = st.fixed_dictionaries(
    {"t": st.just("call"), "id": st.integers(-1, 2**64 - 1), "method": st.sampled_from([*ipc.CALL_ARGS, "getattr"]),
     "args": st.one_of(plain, st.dictionaries(st.sampled_from(["peer", "tag", "timeout_s", "group", "op", "topic",
                                                               "step", "value", "peers", "data", "digest", "key",
                                                               "prefix"]), plain, max_size=5))},
    optional={"shm": st.one_of(st.text(max_size=10), st.just("../../etc/passwd")), "tensors": refs})


def _check_built(message: ipc.Message) -> None:
    """What the daemon does with a message must be cheap and well-typed."""
    if isinstance(message, ipc.Call):
        schema = ipc.CALL_ARGS[message.method]
        assert set(message.args) == set(schema)
        for key in ("value", "data"):
            if key in message.args:
                assert isinstance(message.args[key], bytes)  # bytes(x) copies, never allocates from an int
        for ref in message.tensors:
            assert ref.dtype in ipc.DTYPE_BYTES and len(ref.shape) <= ipc.MAX_RANK


@settings(max_examples=1000, deadline=None)
@given(st.one_of(calls, st.fixed_dictionaries({"t": st.sampled_from(["hello", "progress", "release", "reply", "stop",
                                                                     "setup", "x"])},
                                               optional={"kind": plain, "step": plain, "tokens": plain,
                                                         "elapsed_s": plain, "metrics": plain, "shm": plain,
                                                         "index": plain, "pid": plain, "reason": plain})))
def test_structured_messages_are_refused_or_fully_checked(body: dict) -> None:
    try:
        message = ipc.decode(body)
    except ProtocolViolation:
        return
    _check_built(message)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=200), plain.map(lambda v: msgpack.packb(v, use_bin_type=True)),
                 calls.map(lambda m: msgpack.packb(m, use_bin_type=True))))
def test_any_frame_on_the_socket_gives_a_message_or_a_violation(body: bytes) -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(len(body).to_bytes(4, "big") + body)
        reader.feed_eof()
        async with asyncio.timeout(2):
            try:
                _check_built(await ipc.recv(reader))
            except (ProtocolViolation, EndOfStream):
                pass

    asyncio.run(main())


@pytest.mark.parametrize(("body", "match"), [
    ({"t": []}, "unknown IPC message"),  # an unhashable tag (found by the fuzzer in CI)
    ({"t": {"a": 1}}, "unknown IPC message"),
    ({"t": "call", "id": 1, "method": "publish", "args": {"topic": "zo", "step": 1, "value": 10**9}}, "must be bytes"),
    ({"t": "call", "id": 1, "method": "put_blob", "args": {"data": 2**40}}, "unknown field .data."),  # bytes go in shm
    ({"t": "call", "id": 1, "method": "__class__", "args": {}}, "unknown Comm method"),
    ({"t": "call", "id": 1, "method": "members", "args": {}, "shm": "../../etc/passwd"}, "segment name"),
    ({"t": "call", "id": 1, "method": "exchange", "args": {"peer": "p", "tag": "t", "timeout_s": float("inf")}},
     "timeout_s"),
    ({"t": "call", "id": 1, "method": "collect", "args": {"topic": "zo", "step": 1, "peers": [1], "timeout_s": 1}},
     "list of at most"),
    ({"t": "call", "id": 1, "method": "members", "args": {}, "shm": "s", "tensors": [["w", "float32", [4], 0, 4]]},
     "nbytes 4 is not shape"),
    ({"t": "call", "id": 1, "method": "members", "args": {}, "tensors": [["w", "object", [1], 0, 8]]}, "dtype"),
    ({"t": "call", "id": 1, "method": "members", "args": {}, "tensors": [["w", "uint8", [1] * 9, 0, 1]]}, "rank"),
    ({"t": "progress", "kind": "pwn", "step": 1, "tokens": 0, "elapsed_s": 0.0}, "progress kind"),
    ({"t": "progress", "kind": "log", "step": 1, "tokens": 0, "elapsed_s": 0.0, "metrics": {"x": {"a": 1}}},
     "metrics"),
    ({"t": "release", "shm": ""}, "must name a segment"),
])
def test_what_the_daemon_would_act_on_blindly_is_refused(body: dict, match: str) -> None:
    with pytest.raises(ProtocolViolation, match=match):
        ipc.decode(body)


def test_the_dtype_table_is_the_shared_memory_one() -> None:
    from hyphae.node.shm import ITEM_BYTES

    assert ipc.DTYPE_BYTES == ITEM_BYTES
