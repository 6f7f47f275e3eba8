"""The daemon acts on peer scores: flagged peers are disconnected at once, banned ones again if
they come back, and every score is served at /api/v1/peers/scores."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from hyphae.node.peer_scores import PeerScoreService
from hyphae.protocol.scoring import Severity, scores_for


class FakeHost:
    def __init__(self) -> None:
        self.peer_id = f"local-{id(self)}"
        self.listeners: list = []
        self.disconnected: list[str] = []

    def add_listener(self, fn) -> None:
        self.listeners.append(fn)

    def remove_listener(self, fn) -> None:
        self.listeners.remove(fn)

    async def disconnect(self, peer_id: str) -> None:
        self.disconnected.append(peer_id)


async def test_a_peer_crossing_the_threshold_is_disconnected_and_kept_out_while_banned() -> None:
    host = FakeHost()
    svc = PeerScoreService(SimpleNamespace(host=host), check_interval_s=30.0)
    scores = scores_for(host)
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(svc.run())
        await asyncio.sleep(0.05)
        # reported from another thread, as a pubsub validator in the libp2p thread would
        reporter = threading.Thread(target=lambda: [scores.report("bad", "x.lie", Severity.SEVERE) for _ in range(3)])
        reporter.start()
        reporter.join()
        async with asyncio.timeout(2):  # not the 30 s poll: the score table woke the service
            while host.disconnected != ["bad"]:
                await asyncio.sleep(0.01)
        assert scores.is_banned("bad") and scores.over_threshold() == []
        for listener in host.listeners:
            listener("connected", "bad")  # it passed hello again
            listener("connected", "good")
        async with asyncio.timeout(2):
            while host.disconnected != ["bad", "bad"]:
                await asyncio.sleep(0.01)
        assert svc.disconnected == 2
        assert (await svc.status())["counters"]["peers_disconnected_for_score"] == 2
        task.cancel()
    assert host.listeners == []


async def test_scores_are_served_worst_first() -> None:
    host = FakeHost()
    svc = PeerScoreService(SimpleNamespace(host=host))
    scores_for(host).report("a", "runsync.rate", Severity.MINOR)
    scores_for(host).report("b", "tensor.violation", Severity.MAJOR, "bad frame")
    app = web.Application()
    for add in svc.api_routes():
        add(app)
    async with TestClient(TestServer(app)) as client:
        body = await (await client.get("/api/v1/peers/scores")).json()
    assert list(body["peers"]) == ["b", "a"]
    assert body["peers"]["b"]["violations"] == {"tensor.violation": 1}
    assert body["peers"]["b"]["last_detail"] == "bad frame"
    assert body["disconnect_below"] < 0 and body["disconnected"] == 0
