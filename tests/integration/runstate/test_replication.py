"""The run state replicated by real hosts on loopback: convergence, partitions, forgeries,
restarts."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

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


_PROCESS = '''
import asyncio, json, sys
from pathlib import Path
from hyphae.protocol.config import HostConfig
from hyphae.protocol.host import open_host
from hyphae.protocol.identity import load_or_create_identity
from hyphae.protocol.runstate import RunState, RunStore, SyncConfig, open_run_state

async def main(key, path, bootstrap, step):
    ident = load_or_create_identity(Path(key))
    state = RunState("itest", ident)
    store = RunStore(Path(path))
    loaded = store.load(state)  # what the disk held, before any peer could tell us
    print(json.dumps({"loaded": loaded, "progress": state.value("progress", ident.peer_id)}), flush=True)
    config = HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False, bootstrap=(bootstrap,))
    async with open_host(ident, config, agent="rs-proc/1") as host:
        async with open_run_state(host, state, config=SyncConfig(save_interval_s=0.2), store=store):
            state.set_member(addrs=list(host.addrs))
            state.add_listener(lambda envs, local: any(e.section == "config" for e in envs)
                               and print(json.dumps({"config": state.run_config()}), flush=True))
            if step is not None:
                state.set_progress({"step": step})
            await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]) if sys.argv[4] != "-" else None))
'''


async def test_a_sigkilled_process_resumes_from_its_file_and_catches_up(runnet, tmp_path) -> None:
    import json
    import signal
    import sys

    net = await runnet(2)
    await net.ready()
    script = tmp_path / "member.py"
    script.write_text(_PROCESS)
    key, path = tmp_path / "member.key", tmp_path / "member" / "runstate.msgpack"

    async def start(step: str) -> tuple[asyncio.subprocess.Process, dict]:
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), str(key), str(path),
                                                    net.members[0].host.addrs[0], step,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        return proc, json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))

    proc, first = await start("41")
    try:
        assert first == {"loaded": 0, "progress": {}}
        await net.wait(lambda s: any(v == {"step": 41} for v in s.replica.values("progress").values()), 20,
                       "the process's progress everywhere")
        await asyncio.sleep(0.6)  # a periodic save has happened since
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    net.states[0].set_config({"while_dead": True})
    proc, second = await start("-")
    try:
        assert second["loaded"] >= 2 and second["progress"] == {"step": 41}  # resumed from its own file
        while True:  # ... and caught up with what was written while it was dead
            line = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
            if line.get("config", {}).get("while_dead"):
                break
        await net.wait(lambda s: len(s.live_members()) == 3, 20, "the restarted process live again")
    finally:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
