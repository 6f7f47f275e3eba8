"""The run state replicated by real hosts on loopback: convergence, partitions, forgeries,
restarts."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from hyphae.protocol.identity import Identity
from hyphae.protocol.runstate import SyncReply, SyncRequest, sign_envelope
from hyphae.protocol.runstate.doc import new_section_doc
from hyphae.protocol.testing import wait_for

from .conftest import summary

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]
log = logging.getLogger(__name__)


async def test_a_config_write_on_node_0_reaches_all_8_nodes(runnet) -> None:
    net = await runnet(8)
    await net.ready()
    samples = []
    for k in range(5):
        await asyncio.sleep(0.3)
        net.states[0].set_config({"lr": k / 10})
        times = await net.time_to_all(lambda s, k=k: s.run_config().get("lr") == k / 10, 10, f"lr={k / 10}")
        samples.append(max(times))
    print(f"\n8 nodes, config write to all: {summary(samples)}")
    assert max(samples) < 5.0


async def test_both_halves_of_a_partition_keep_their_writes_after_it_heals(runnet) -> None:
    net = await runnet(6)
    await net.ready()
    side_a = {m.peer_id for m in net.members[:3]}
    for m in net.members:
        mine = side_a if m.peer_id in side_a else {x.peer_id for x in net.members} - side_a
        m.node.link_filter = mine.__contains__
    a0, a1, b0, b1 = net.members[0], net.members[1], net.members[3], net.members[4]
    a0.state.set_config({"phase": "a-side"})
    a1.state.set_progress({"step": 11})
    b0.state.set_progress({"step": 22})
    b1.state.claim_experts([1, 2], since=5)
    b1.state.add_checkpoint("ckpt-5", step=5, digest="ab" * 16, size_bytes=10)
    await asyncio.sleep(3)
    assert b0.state.run_config().get("phase") is None  # the partition held
    assert a0.state.value("progress", b0.peer_id) == {}
    for m in net.members:
        m.node.link_filter = None
    times = await net.time_to_all(
        lambda s: (s.run_config().get("phase") == "a-side" and s.value("progress", a1.peer_id) == {"step": 11}
                   and s.value("progress", b0.peer_id) == {"step": 22} and s.expert_owners() == {1: b1.peer_id,
                                                                                               2: b1.peer_id}
                   and [c["id"] for c in s.checkpoints()] == ["ckpt-5"]), 20, "every write on every node")
    print(f"\n6 nodes, partition healed, all writes everywhere after {summary(times)}")
    quiet = lambda s: {k: v for k, v in s.replica.fingerprint().items() if k[1] != "member"}  # noqa: E731
    await net.wait(lambda s: quiet(s) == quiet(net.states[0]), 20, "identical streams everywhere")


async def test_forged_updates_are_rejected_everywhere_and_never_spread(runnet) -> None:
    net = await runnet(4)
    await net.ready()
    alice = net.members[1]
    mallory = await net.add()
    await net.ready()
    key = mallory.identity
    forged = [
        # 1. claims to be Alice's progress, signed by Mallory: bad signature
        sign_envelope(key, "itest", "progress", 10**13, 0, new_section_doc({"step": 666}).get_update()),
        # 2. Mallory's own member entry that claims to be Alice's
        sign_envelope(key, "itest", "member", 10**13, 0, new_section_doc({"peer_id": alice.peer_id}).get_update()),
        # 3. a non-owner writing config
        sign_envelope(key, "itest", "config", 10**13, 0, new_section_doc({"lr": {"v": 666, "ts": 1}}).get_update()),
    ]
    forged[0] = dataclasses.replace(forged[0], author=alice.peer_id)
    digests = {e.digest for e in forged}
    before = [s.rejected_count for s in net.states[:4]]
    for env in forged:
        await mallory.host.publish(mallory.node.topic, env.encode())

    # Mallory's sync now answers every request with the forgeries (pooled streams keep their
    # handler, so the answer is swapped rather than the protocol handler).
    mallory.state.answer = lambda request, max_bytes: SyncReply("itest", [e.encode() for e in forged], False, False)

    async def pulled_all_three(i: int) -> bool:
        await net.members[i].node.sync_with(mallory.peer_id)
        return net.members[i].state.rejected_count >= before[i] + 3

    for i, m in enumerate(net.members[:4]):
        await m.host.connect(mallory.host.addrs[0])
        await wait_for(lambda i=i: pulled_all_three(i), 10, f"node {i} to reject all three forgeries", 0.2)
    for i, m in enumerate(net.members[:4]):
        assert not digests & {e.digest for e in m.state.envelopes()}
        assert m.state.value("progress", alice.peer_id).get("step") != 666
        assert "lr" not in m.state.run_config()
        served = m.state.answer(SyncRequest("itest", {}), 1 << 22).envelopes
        assert not {e.encode() for e in forged} & set(served)
    # A few anti-entropy rounds among honest nodes later, still nobody holds them.
    await asyncio.sleep(2.5)
    assert all(not digests & {e.digest for e in m.state.envelopes()} for m in net.members[:4])


async def test_a_killed_node_resumes_from_disk_and_catches_up(runnet) -> None:
    net = await runnet(3, store=True, save_interval_s=0.2)
    await net.ready()
    victim = net.members[2]
    net.states[0].set_config({"epoch_of_test": 1})
    victim.state.set_progress({"step": 41})
    await net.wait(lambda s: s.run_config().get("epoch_of_test") == 1, 10, "config 1 everywhere")
    await asyncio.sleep(0.6)  # a periodic save has happened since
    joined_ms = victim.state.value("member", victim.peer_id)["joined_ms"]
    await net.remove(victim, crash=True)
    net.states[0].set_config({"epoch_of_test": 2})
    net.states[1].set_progress({"step": 7})

    back = await net.add(identity=victim.identity, store=True)
    assert back.state.value("progress", back.peer_id) == {"step": 41}  # resumed from its own disk
    assert back.state.value("member", back.peer_id)["joined_ms"] == joined_ms
    await net.wait(lambda s: s.run_config().get("epoch_of_test") == 2 and s.value("progress", net.members[1].peer_id)
                   == {"step": 7}, 15, "the restarted node caught up")
    await net.ready()
