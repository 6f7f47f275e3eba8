"""The daemon's scalar pubsub and algo-state reads under hostile input (no network: a fake host).

Every scalar message from a peer goes through the pubsub validator and the handler exactly as
the Host would call them; the host here only records publishes.
"""

import asyncio
from types import SimpleNamespace

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyphae.node import comm_backend as cb
from hyphae.node.comm_backend import CommBackend, _from_json
from hyphae.protocol.scoring import scores_for


class FakeHost:
    peer_id = "12D3KooWSelf"

    def __init__(self) -> None:
        self.published: list[bytes] = []
        self.peer_id = f"12D3KooWSelf{id(self)}"  # a score table of its own

    async def subscribe(self, topic, handler, *, validator=None) -> None:
        self.handler, self.validator = handler, validator

    async def publish(self, topic, data) -> None:
        self.published.append(data)


def backend(tmp_path) -> CommBackend:
    daemon = SimpleNamespace(host=FakeHost(), config=SimpleNamespace(host=SimpleNamespace(network="net")),
                             datadir=SimpleNamespace(root=tmp_path), service=lambda name: None)
    return CommBackend(daemon)


def deliver(b: CommBackend, author: str, message) -> bool:
    data = message if isinstance(message, bytes) else msgpack.packb(message, use_bin_type=True)
    ok = b._validate_scalar(author, data)
    if ok:
        b._on_scalar(author, data)
    return ok


def scalar(topic="zo", step=0, value=b"\x01"):
    return {"topic": topic, "step": step, "value": value}


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300), msgpack_values.map(lambda v: msgpack.packb(v, use_bin_type=True)),
                 st.fixed_dictionaries({"topic": st.text(max_size=80), "step": st.integers(-5, 2**64 - 1),
                                        "value": st.binary(max_size=1100)}).map(msgpack.packb)))
def test_scalar_validator_and_handler_never_crash_on_any_bytes(tmp_path, data: bytes) -> None:
    b = backend(tmp_path)
    deliver(b, "12D3KooWPeer", data)
    assert len(b._scalars) <= 1


def test_first_value_wins_and_equivocation_is_scored_severe(tmp_path) -> None:
    b = backend(tmp_path)
    assert deliver(b, "P", scalar(value=b"a"))
    assert deliver(b, "P", scalar(value=b"b"))
    assert b._scalars[("zo", 0)]["P"] == b"a"
    assert b.scalar_stats["equivocations"] == 1
    assert round(scores_for(b.daemon.host).score("P")) == -50


def test_a_step_far_ahead_neither_wipes_the_slots_being_collected_nor_is_kept(tmp_path) -> None:
    async def main() -> None:
        b = backend(tmp_path)
        await b.publish("zo", 10, b"\x05")
        assert deliver(b, "Honest", scalar(step=10, value=b"\x06"))
        assert deliver(b, "Liar", scalar(step=2**61))
        assert ("zo", 2**61) not in b._scalars
        got = await b.collect("zo", 10, ["Honest", b.peer_id], timeout_s=0.1)
        assert got == {"Honest": b"\x06", b.peer_id: b"\x05"}

    asyncio.run(main())


def test_an_author_over_its_rate_is_refused_by_the_validator_and_scored(tmp_path) -> None:
    b = backend(tmp_path)
    results = [deliver(b, "Flood", scalar(step=i)) for i in range(int(cb.SCALAR_RATE.burst) + 20)]
    assert results.count(False) >= 19
    assert scores_for(b.daemon.host).scores()["Flood"]["violations"]["scalar.rate"] >= 19
    assert deliver(b, "Other", scalar())  # one peer's flood costs the others nothing


def test_memory_is_bounded_in_topics_and_steps(tmp_path) -> None:
    b = backend(tmp_path)
    b._scalar_rate = SimpleNamespace(allow=lambda key: True)
    for i in range(cb.MAX_SCALAR_TOPICS * 3):
        deliver(b, "P", scalar(topic=f"t{i}"))
    for i in range(cb.SCALAR_AHEAD_STEPS + 50):
        deliver(b, "P", scalar(topic="steps", step=i))
    topics = {k[0] for k in b._scalars}
    assert len(topics) <= cb.MAX_SCALAR_TOPICS
    assert len([k for k in b._scalars if k[0] == "steps"]) <= cb.SCALAR_AHEAD_STEPS


def test_a_malformed_bytes_value_in_the_run_state_reads_back_as_written() -> None:
    assert _from_json({"$bytes": "zz"}) == {"$bytes": "zz"}
    assert _from_json({"$bytes": "0aff"}) == b"\x0a\xff"
    assert _from_json([{"$bytes": "0g"}]) == [{"$bytes": "0g"}]


def _blobs_on_disk(b: CommBackend) -> set[str]:
    return {p.name for p in b.blob_dir.iterdir() if not p.name.startswith(".")}


def test_the_local_blob_store_keeps_the_most_recently_used_within_its_budget(tmp_path) -> None:
    async def main() -> None:
        b = backend(tmp_path)
        b.blob_budget = cb.BlobBudget(max_blobs=3, max_bytes=10_000)
        blobs = [bytes([i]) * 1000 for i in range(8)]
        names = []
        for data in blobs:
            names.append(await b.put_blob(data))
            assert len(_blobs_on_disk(b)) <= 3
        assert _blobs_on_disk(b) == set(names[-3:])
        assert await b.get_blob(names[5], timeout_s=1) == blobs[5]  # used: now the newest
        await b.put_blob(b"new" * 1000)
        assert names[5] in _blobs_on_disk(b) and names[6] not in _blobs_on_disk(b)
        big = await b.put_blob(b"x" * 50_000)  # over the byte cap alone: kept, everything else goes
        assert _blobs_on_disk(b) == {big}
        assert await b.get_blob(big, timeout_s=1) == b"x" * 50_000

    asyncio.run(main())
