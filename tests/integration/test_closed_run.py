"""A closed run: without the secret (or off the allowlist) a node cannot join, write or fetch;
with it, it can. Real daemons and real hosts on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from hyphae.node.client import ApiClient
from hyphae.node.testing import DaemonProcess, sync_wait
from hyphae.protocol.admission import Admission, load_allowlist, make_allowlist
from hyphae.protocol.config import HostConfig
from hyphae.protocol.errors import HyphaeError
from hyphae.protocol.host import open_host
from hyphae.protocol.identity import Identity
from hyphae.protocol.tensor import TensorConfig, open_tensor_plane
from hyphae.protocol.tensor.blobs import BlobConfig, BlobService
from hyphae.protocol.testing import RawPeer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

RUN = "closed-test"


def _ready_peers(d: DaemonProcess) -> set[str]:
    return {p["peer_id"] for p in ApiClient(d.info["api_url"]).peers() if p["agent"]}


def _members(d: DaemonProcess) -> set[str]:
    return {m["peer_id"] for m in ApiClient(d.info["api_url"]).get("/api/v1/run").get("members", [])}


def test_daemons_without_the_secret_cannot_join_or_write_and_with_it_can(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex())
    wrong = tmp_path / "wrong"
    wrong.write_text(os.urandom(32).hex())
    for path in (secret, wrong):
        path.chmod(0o600)  # the daemon refuses a secret others could read, as ssh does
    for path in (secret, wrong):
        path.chmod(0o600)  # a daemon refuses a secret file others may read
    closed = ["--run", RUN, "--run-secret-file", str(secret)]
    a = DaemonProcess(tmp_path / "a", closed).start()
    daemons = [a]
    try:
        boot = ["--bootstrap", a.multiaddr]
        b = DaemonProcess(tmp_path / "b", [*closed, *boot]).start()
        stranger = DaemonProcess(tmp_path / "c", ["--run", RUN, *boot]).start()
        guesser = DaemonProcess(tmp_path / "d", ["--run", RUN, "--run-secret-file", str(wrong), *boot]).start()
        daemons += [b, stranger, guesser]
        sync_wait(lambda: b.peer_id in _ready_peers(a) and {a.peer_id, b.peer_id} <= _members(a)
                  and {a.peer_id, b.peer_id} <= _members(b), 60, "a and b meet and share the run")
        # The outsiders have had as long as b; give them a few more seconds of trying.
        sync_wait(lambda: "not admitted" in a.log(), 30, "a refused someone")
        for outsider in (stranger, guesser):
            assert outsider.peer_id not in _ready_peers(a) | _ready_peers(b)
            assert a.peer_id not in _ready_peers(outsider)
            # Its own run state names it a member; nobody else's does: its writes went nowhere.
            assert outsider.peer_id in _members(outsider)
            assert outsider.peer_id not in _members(a) | _members(b)
        info = ApiClient(a.info["api_url"]).get("/api/v1/node")
        assert info["run_admission"] == {"closed": True, "secret": True, "allowlist": None}
        assert secret.read_text() not in json.dumps(info) + a.log()  # the secret is never shown
    finally:
        for d in daemons:
            d.kill()


async def _blob_host(stack_host, tmp_path: Path, name: str, admission: Admission | None, identity: Identity,
                     bootstrap: tuple[str, ...] = ()):
    host = await stack_host(open_host(identity, HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False,
                                                           bootstrap=bootstrap), agent="closed-test/1",
                                      admission=admission))
    plane = await stack_host(open_tensor_plane(host, TensorConfig(listen=("/ip4/127.0.0.1/tcp/0",))))
    return host, BlobService(plane, BlobConfig(directory=tmp_path / name))


@pytest.mark.parametrize("closed_by", ["secret", "allowlist"])
async def test_an_outsider_cannot_fetch_a_blob_of_a_closed_run_and_a_member_can(tmp_path: Path, closed_by: str) -> None:
    from contextlib import AsyncExitStack

    ids = {n: Identity.generate() for n in ("owner", "member", "outsider")}
    if closed_by == "secret":
        key = os.urandom(32)
        admit = {n: Admission.closed_by(RUN, secret=key) for n in ("owner", "member")}
        admit["outsider"] = Admission.closed_by(RUN, secret=os.urandom(32))
    else:
        path = tmp_path / "allow.json"
        make_allowlist(ids["owner"], RUN, [ids["member"].peer_id], path)
        _, peers = load_allowlist(path, RUN, ids["owner"].peer_id)
        admit = {n: Admission.closed_by(RUN, allowlist=peers) for n in ids}
    async with AsyncExitStack() as stack:
        owner, owner_blobs = await _blob_host(stack.enter_async_context, tmp_path, "o", admit["owner"], ids["owner"])
        blob_id = await owner_blobs.put(os.urandom(300_000))
        boot = (owner.addrs[0],)
        member, member_blobs = await _blob_host(stack.enter_async_context, tmp_path, "m", admit["member"],
                                                ids["member"], boot)
        outsider, outsider_blobs = await _blob_host(stack.enter_async_context, tmp_path, "x", admit["outsider"],
                                                    ids["outsider"], boot)
        assert await member_blobs.get(blob_id, providers=[owner.peer_id], timeout_s=30)
        with pytest.raises((HyphaeError, TimeoutError, asyncio.TimeoutError)):
            await outsider_blobs.get(blob_id, providers=[owner.peer_id], timeout_s=8)
        assert not outsider_blobs.has(blob_id)
        await wait_for(lambda: _sees(owner, member.peer_id), 10, "the owner sees the member")
        assert not await _sees(owner, outsider.peer_id)  # the owner never admitted it


async def _sees(host, peer_id: str) -> bool:
    return any(p.peer_id == peer_id and p.agent for p in await host.peers())


@asynccontextmanager
async def _member_and_stranger():
    """Two hosts on loopback: a member of a closed run (secret) and a stranger of an open one."""
    config = HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False)
    async with open_host(Identity.generate(), config, agent="closed-test/1",
                         admission=Admission.closed_by(RUN, secret=os.urandom(32))) as member:
        async with open_host(Identity.generate(), config, agent="closed-test/1") as stranger:
            yield member, stranger


async def test_a_request_is_not_sent_to_a_stranger_whose_refusal_closed_the_connection_first(tmp_path: Path) -> None:
    """The race CI hit: the member dials a stranger to ask it something, the stranger's hello is
    refused and the connection closed before the request goes out. py-libp2p's new_stream would
    dial again and send before any hello, and the stranger's reply (a sync reply carrying its
    member entry) entered the closed run. Here the scheduler's slowness is made certain."""
    import trio

    asked: list[str] = []

    async def answer(peer_id: str, request: object) -> object:
        asked.append(peer_id)
        return {"envelopes": ["a stranger's writes"]}

    async with _member_and_stranger() as (member, stranger):
        stranger.serve("/hyphae/closed-test/1", answer)
        trio_host = member._trio
        dial_then_lose_the_race = trio_host._reach

        async def reach(peer_id: str) -> None:
            trio_host.host.get_peerstore().add_addrs(ID.from_base58(peer_id), [Multiaddr(stranger.addrs[0])], 3600)
            await dial_then_lose_the_race(peer_id)
            with trio.fail_after(10):
                while trio_host._has_conn(peer_id):  # the hello refusal closes it
                    await trio.sleep(0.02)

        trio_host._reach = reach
        with pytest.raises(HyphaeError, match="not admitted"):
            await member.request(stranger.peer_id, "/hyphae/closed-test/1", {"heads": []})
        await asyncio.sleep(0.5)
        assert asked == [], "the stranger was asked (and answered) before it passed admission"


def test_allowlist_cli_signs_a_list_that_checks_out_and_a_tampered_one_does_not(tmp_path: Path) -> None:
    other = Identity.generate().peer_id
    out = tmp_path / "allow.json"
    done = subprocess.run([sys.executable, "-m", "hyphae.cli", "run", "allowlist", other, "--run", RUN,
                           "--out", str(out), "--data-dir", str(tmp_path / "node")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    creator, peers = load_allowlist(out, RUN, None)
    assert peers == {creator, other}
    data = json.loads(out.read_text())
    data["peers"].append(Identity.generate().peer_id)
    out.write_text(json.dumps(data))
    bad = subprocess.run([sys.executable, "-m", "hyphae.cli", "node", "join", "--no-train", "--run", RUN,
                          "--run-allowlist", str(out), "--data-dir", str(tmp_path / "n2"), "--api", "127.0.0.1:0",
                          "--listen", "/ip4/127.0.0.1/tcp/0", "--no-mdns"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "not signed by" in bad.stderr, bad.stderr


async def test_a_refused_stranger_is_not_dialled_or_greeted_again_by_discovery(tmp_path: Path) -> None:
    """The dialer speaks first, so each time discovery (DHT, mDNS, peer book) redialled a refused
    stranger it got our hello and listed us as its peer until we hung up: under CPU load the
    daemon test caught a stranger listing the closed run's bootstrap (6 runs of 8)."""
    from libp2p.peer.peerinfo import info_from_p2p_addr

    async with _member_and_stranger() as (member, stranger):
        greeted: list[str] = []
        stranger.add_listener(lambda kind, peer: greeted.append(peer) if kind == "connected" else None)
        trio_host = member._trio

        await member.connect(stranger.addrs[0])  # asked for by name: our hello goes, theirs is refused
        await wait_for(lambda: trio_host.held_off(stranger.peer_id, "dht"), 10, "the member refuses the stranger")
        await wait_for(lambda: not trio_host.is_connected(stranger.peer_id), 10, "the member hangs up")
        assert greeted == [member.peer_id]

        # Discovery offers the stranger again: no dial at all.
        addr = Multiaddr(stranger.addrs[0])
        assert await member._bridge.run(trio_host.dial, stranger.peer_id, [addr], "dht") is False
        # py-libp2p's DHT dials on its own: the member hangs up without a hello.
        await member._bridge.run(trio_host.host.connect, info_from_p2p_addr(addr))
        await wait_for(lambda: not trio_host.is_connected(stranger.peer_id), 10, "the member hangs up again")
        await asyncio.sleep(1.0)
        assert greeted == [member.peer_id], "the stranger was greeted again"

        # An explicit dial (a bootstrap address, `hyphae node connect`) is never held off.
        assert not trio_host.held_off(stranger.peer_id, "bootstrap")
        assert trio_host.held_off(stranger.peer_id, "mdns")


async def _keep_connecting(raw: RawPeer, addr: str) -> None:
    """The eavesdropper of issue 23: dropped for want of a hello, it dials straight back."""
    while True:
        with contextlib.suppress(Exception):
            await raw.connect(addr)
        await asyncio.sleep(0.3)


async def test_a_stranger_on_gossipsub_gets_no_message_of_a_closed_run_while_a_member_gets_them_all() -> None:
    """py-libp2p's pubsub is not gated by our hello: a fresh identity with no secret that only
    speaks gossipsub (and reconnects whenever dropped) received every run-state envelope."""
    key = os.urandom(32)
    topic = f"/hyphae/run/{RUN}/1"
    config = HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False)
    published = [f"envelope-{i}".encode() for i in range(8)]
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(open_host(Identity.generate(), config, agent="closed-test/1",
                                                      admission=Admission.closed_by(RUN, secret=key)))
        b = await stack.enter_async_context(open_host(
            Identity.generate(), HostConfig(listen=config.listen, mdns=False, bootstrap=(a.addrs[0],)),
            agent="closed-test/1", admission=Admission.closed_by(RUN, secret=key)))
        got: list[bytes] = []
        await a.subscribe(topic, lambda author, data: None)
        await b.subscribe(topic, lambda author, data: got.append(data))
        raw = await stack.enter_async_context(RawPeer())
        stolen = await raw.listen_gossip(topic)
        dialer = asyncio.create_task(_keep_connecting(raw, a.addrs[0]))
        try:
            await wait_for(lambda: _topic_has(a, topic, b.peer_id), 20, "b in a's topic")
            await asyncio.sleep(2.0)  # a heartbeat or two: time for the stranger to be grafted
            for data in published:
                await a.publish(topic, data)
                await asyncio.sleep(0.5)
            await wait_for(lambda: len(got) == len(published), 15, lambda: f"b to get all 8 (got {len(got)})")
            await asyncio.sleep(1.0)
        finally:
            dialer.cancel()
        assert sorted(got) == sorted(published)
        assert stolen == [], f"the stranger received {len(stolen)} of {len(published)} messages"
        assert raw.identity.peer_id not in await a.topic_peers(topic)


async def _topic_has(host, topic: str, peer_id: str) -> bool:
    return peer_id in await host.topic_peers(topic)


async def test_daemons_of_a_closed_run_publish_while_a_gossip_only_stranger_listens_and_it_gets_nothing(
        tmp_path: Path) -> None:
    """The probe of issue 23 against real daemons: a stranger connected to a member, subscribed to
    ``/hyphae/run/<run>/1`` and redialling whenever dropped, while two more members join (each
    join is signed run-state envelopes published on that topic)."""
    secret = tmp_path / "secret"
    secret.write_text(os.urandom(32).hex())
    secret.chmod(0o600)
    closed = ["--run", RUN, "--run-secret-file", str(secret)]
    a = await asyncio.to_thread(DaemonProcess(tmp_path / "a", closed).start)
    daemons = [a]
    try:
        async with RawPeer() as raw:
            stolen = await raw.listen_gossip(f"/hyphae/run/{RUN}/1")
            dialer = asyncio.create_task(_keep_connecting(raw, a.multiaddr))
            try:
                await asyncio.sleep(2.0)  # connected and subscribed before anything is written
                for name in ("b", "c"):
                    d = DaemonProcess(tmp_path / name, [*closed, "--bootstrap", a.multiaddr])
                    daemons.append(await asyncio.to_thread(d.start))
                everyone = {d.peer_id for d in daemons}
                await asyncio.to_thread(sync_wait, lambda: all(everyone <= _members(d) for d in daemons), 60,
                                        "every member to hold every member entry")
                await asyncio.sleep(2.0)
            finally:
                dialer.cancel()
        assert stolen == [], f"the stranger received {len(stolen)} run-state envelopes"
        assert "not admitted" in a.log() or "no hello within" in a.log()  # it was there, and turned away
    finally:
        for d in daemons:
            d.kill()
