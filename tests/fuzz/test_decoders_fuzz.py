"""Every remaining decoder of untrusted bytes, fuzzed: each ends in a value or its one documented
error, never another exception, never a hang, never an allocation sized by an unchecked length.

Covered here: hello (wire), framed libp2p streams (recv), the blob and all-reduce request
handlers of the tensor plane, blob manifests, the run-state file, the peer book file, checkpoint
manifests, node config files, identity keys, and the ZO 1-byte scalar codec. (Run-state wire,
tensor wire/session/codecs, IPC, scalar pubsub, API bodies and live streams have their own.)
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyphae.node.config import load_config
from hyphae.protocol.errors import ConfigError, EndOfStream, HyphaeError, ProtocolViolation
from hyphae.protocol.hello import Hello
from hyphae.protocol.identity import Identity
from hyphae.protocol.peerbook import PeerBook
from hyphae.protocol.runstate.store import decode_file
from hyphae.protocol.stream import TrioFramedStream
from hyphae.protocol.tensor.allreduce import AllReduce
from hyphae.protocol.tensor.blobs import BlobConfig, BlobService
from hyphae.protocol.tensor.blobstore import Manifest as BlobManifest
from hyphae.training import _zo_codec
from hyphae.training.checkpoint import CheckpointError, Manifest

N = int(os.environ.get("HYPHAE_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=N or 400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

plain = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=16)
    | st.binary(max_size=32),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
packed = plain.map(lambda v: msgpack.packb(v, use_bin_type=True))


@FUZZ
@given(st.one_of(plain, st.fixed_dictionaries(
    {"v": plain | st.just(1), "agent": plain | st.text(max_size=200), "network": plain | st.text(max_size=80),
     "roles": plain | st.lists(st.text(max_size=40), max_size=10),
     "listen": plain | st.lists(st.text(max_size=300), max_size=20)})))
def test_hello_from_wire(message) -> None:
    try:
        hello = Hello.from_wire(message)
    except ProtocolViolation:
        return
    assert len(hello.agent) <= 128 and len(hello.listen) <= 16 and all(len(a) <= 256 for a in hello.listen)


class _BytesStream:
    """Enough of a libp2p INetStream to feed TrioFramedStream from bytes, in odd-sized reads."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data, self.pos, self.chunk = data, 0, chunk
        self.asked = 0
        self.muxed_conn = SimpleNamespace(peer_id="fuzz")

    def get_protocol(self) -> str:
        return "/fuzz/1"

    async def read(self, n: int) -> bytes:
        self.asked = max(self.asked, n)
        await trio.lowlevel.checkpoint()
        out = self.data[self.pos:self.pos + min(n, self.chunk)]
        self.pos += len(out)
        return out


@FUZZ
@given(st.one_of(st.binary(max_size=300),
                 st.lists(packed, max_size=4).map(lambda bodies: b"".join(len(b).to_bytes(4, "big") + b for b in bodies)),
                 st.integers(0, 2**32 - 1).map(lambda n: n.to_bytes(4, "big") + b"\x91\x01")),
       st.integers(1, 64))
def test_framed_stream_recv(data: bytes, chunk: int) -> None:
    stream = _BytesStream(data, chunk)
    framed = TrioFramedStream(stream, max_frame_bytes=1024)

    async def drain() -> None:
        with trio.fail_after(5):
            while True:
                try:
                    await framed.recv()
                except (EndOfStream, ProtocolViolation):
                    return

    trio.run(drain)
    assert stream.asked <= 65536  # reads are bounded; nothing is sized by the announced length


def test_a_4_gib_announcement_allocates_nothing() -> None:
    framed = TrioFramedStream(_BytesStream(b"\xff\xff\xff\xff" + b"x" * 100, 7), max_frame_bytes=1 << 20)
    tracemalloc.start()
    with pytest.raises(ProtocolViolation, match="limit"):
        trio.run(framed.recv)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1 << 20


class _Plane:
    peer_id = "me"

    def __init__(self) -> None:
        self.routes = {}

    def serve(self, route, handler) -> None:
        self.routes[route] = handler


@FUZZ
@given(st.one_of(plain, st.fixed_dictionaries({"id": st.one_of(st.text(max_size=70), st.just("ab" * 32)),
                                               "index": plain | st.integers(-5, 2**64 - 1)})),
       st.sampled_from(["/hyphae/blob/have", "/hyphae/blob/get"]))
def test_blob_request_handlers(tmp_path_factory, meta, route: str) -> None:
    plane = _Plane()
    BlobService(plane, BlobConfig(directory=tmp_path_factory.mktemp("blobs")))

    async def ask() -> None:
        try:
            reply = await plane.routes[route]("peer", meta if isinstance(meta, dict) else {"x": meta}, [])
        except ProtocolViolation:
            return
        assert isinstance(reply.meta, dict)

    asyncio.run(ask())


@FUZZ
@given(st.one_of(plain, st.fixed_dictionaries({"tag": st.text(max_size=10), "chunk": plain | st.integers(),
                                               "set": plain | st.lists(plain, max_size=50)})))
def test_allreduce_query_handler(meta) -> None:
    plane = _Plane()
    AllReduce(plane)

    async def ask() -> None:
        try:
            reply = await plane.routes["/hyphae/tensor/allreduce/query"](
                "peer", meta if isinstance(meta, dict) else {"x": meta}, [])
        except ProtocolViolation:
            return
        assert reply.meta == {"have": False}

    if "/hyphae/tensor/allreduce/query" not in plane.routes:
        pytest.skip(f"all-reduce route is {list(plane.routes)}")
    asyncio.run(ask())


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["ab" * 32, "00" * 32]))
def test_blob_manifest_from_bytes(data: bytes, blob_id: str) -> None:
    import hashlib

    for candidate in (data, b"hyphae/blob/1" + data):
        try:
            BlobManifest.from_bytes(candidate, hashlib.sha256(candidate).hexdigest())
            BlobManifest.from_bytes(candidate, blob_id)
        except HyphaeError:
            pass


@FUZZ
@given(st.one_of(st.binary(max_size=300), packed,
                 st.fixed_dictionaries({"v": plain | st.just(1), "run": plain | st.just("r"),
                                        "envelopes": plain | st.lists(st.binary(max_size=80), max_size=5)})
                 .map(lambda m: msgpack.packb(m, use_bin_type=True))))
def test_run_state_file(data: bytes) -> None:
    try:
        decode_file(data, "r")
    except ProtocolViolation:
        pass


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                                         max_size=4), max_leaves=12)


@FUZZ
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"format": json_values | st.just(1),
                                        "peers": json_values | st.lists(json_values, max_size=4)})
                 .map(lambda v: json.dumps(v).encode())))
def test_peer_book_file(tmp_path_factory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("pb") / "peers.json"
    path.write_bytes(data)
    book = PeerBook.load(path)  # never raises: a corrupt book is set aside
    assert len(book) <= book.max_peers


@FUZZ
@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps),
                 st.fixed_dictionaries({"step": json_values, "algorithm": json_values, "model_config": json_values,
                                        "weights_sha256": json_values, "state_sha256": json_values,
                                        "created_unix": json_values}).map(json.dumps)))
def test_checkpoint_manifest(text: str) -> None:
    try:
        Manifest.from_json(text, where=Path("x"))
    except CheckpointError:
        pass


toml_values = st.one_of(st.integers(-5, 10**6), st.booleans(), st.text(max_size=20).map(json.dumps),
                        st.lists(st.text(max_size=10), max_size=3).map(json.dumps))


@FUZZ
@given(st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(["data_dir", "run", "train", "log_level", "bogus"]), toml_values, max_size=3)
    .map(lambda d: "".join(f"{k} = {v}\n" for k, v in d.items())),
    st.tuples(st.sampled_from(["network", "api", "training", "nope"]),
              st.dictionaries(st.sampled_from(["listen", "bootstrap", "mdns", "name", "batch_size", "algorithm",
                                               "seq_len", "max_steps", "x", "dht_mode", "target_peers",
                                               "dial_timeout_s"]), toml_values, max_size=4))
    .map(lambda t: f"[{t[0]}]\n" + "".join(f"{k} = {v}\n" for k, v in t[1].items()))))
def test_node_config_file(tmp_path_factory, text: str) -> None:
    path = tmp_path_factory.mktemp("cfg") / "node.toml"
    path.write_text(text)
    try:
        load_config(file=path, env={})
    except ConfigError:
        pass


@FUZZ
@given(st.one_of(st.binary(max_size=300),
                 st.binary(max_size=120).map(lambda b: b"-----BEGIN PRIVATE KEY-----\n" + b + b"\n-----END PRIVATE KEY-----\n")))
def test_identity_key_file(pem: bytes) -> None:
    try:
        Identity.from_pem(pem)
    except ConfigError:
        pass


@FUZZ
@given(st.binary(max_size=1024))
def test_zo_scalars_decode_within_the_codec_range(data: bytes) -> None:
    values = _zo_codec.decode(data)
    assert len(values) == len(data)
    assert all(math.isfinite(v) and _zo_codec.FLOOR <= abs(v) <= _zo_codec.CEILING for v in values)
