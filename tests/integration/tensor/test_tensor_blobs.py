"""Content-addressed blobs between real hosts: fetched from any provider, verified, resumed after
a provider drops, and spread so that joiners serve each other instead of choking the origin."""

from __future__ import annotations

import asyncio
import os
import time

import numpy as np
import pytest

from hyphae.protocol.tensor import Tensor
from hyphae.protocol.tensor.blobs import BlobConfig, BlobService
from hyphae.protocol.testing import wait_for

from .conftest import same

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def services(planes, tmp_path, **config) -> list[BlobService]:
    return [BlobService(p, BlobConfig(directory=tmp_path / f"blobs-{i}", **config)) for i, p in enumerate(planes)]


async def test_blob_put_on_one_is_fetched_by_others_and_then_served_by_them(make_group, tmp_path) -> None:
    hosts, planes = await make_group(3)
    a, b, c = services(planes, tmp_path, chunk_bytes=64 * 1024)
    data = os.urandom(1_000_000)
    blob_id = await a.put(data)
    assert await b.get(blob_id, timeout_s=30) == data
    assert b.has(blob_id) and (tmp_path / "blobs-1" / f"{blob_id}.blob").read_bytes() == data
    await planes[0].aclose()
    await hosts[0].aclose()  # the origin is gone: c can only get it from b
    assert await c.get(blob_id, timeout_s=30) == data
    assert set(c.stats()["fetched_bytes_by_provider"]) == {planes[1].peer_id}


async def test_tensors_round_trip_through_a_blob(make_group, tmp_path) -> None:
    _, planes = await make_group(2)
    a, b = services(planes, tmp_path)
    ts = [Tensor.from_numpy("w", np.arange(1000, dtype=np.float32).reshape(10, 100)),
          Tensor.from_numpy("step", np.array([7], np.int64))]
    blob_id = await a.put_tensors(ts)
    assert same(await b.get_tensors(blob_id, providers=[planes[0].peer_id], timeout_s=30), ts)


async def test_fetch_resumes_from_another_provider_when_one_drops(make_group, tmp_path) -> None:
    hosts, planes = await make_group(3)
    a, b, c = services(planes, tmp_path, chunk_bytes=32 * 1024, parallel=2, per_provider=1)
    data = os.urandom(2_000_000)
    blob_id = await a.put(data)
    assert await b.put(data) == blob_id
    served = 0
    original = a._on_get

    async def dying_get(peer, meta, tensors):
        nonlocal served
        served += 1
        if served == 5:  # a dies mid-fetch, after serving a few chunks
            await planes[0].aclose()
            await hosts[0].aclose()
        return await original(peer, meta, tensors)

    a._on_get = dying_get
    planes[0].serve("/hyphae/blob/get", dying_get)
    assert await c.get(blob_id, providers=[planes[0].peer_id, planes[1].peer_id], timeout_s=60) == data
    fetched = c.stats()["fetched_bytes_by_provider"]
    assert fetched.get(planes[0].peer_id, 0) > 0 and fetched[planes[1].peer_id] > 0


async def test_a_provider_sending_bad_chunks_is_dropped(make_group, tmp_path) -> None:
    _, planes = await make_group(3)
    liar, honest, c = services(planes, tmp_path, chunk_bytes=32 * 1024)
    data = os.urandom(500_000)
    blob_id = await liar.put(data)
    await honest.put(data)
    liar.store.read_chunk = lambda blob, i: b"\x00" * 32 * 1024 if i < 15 else b"\x00" * (500_000 - 15 * 32 * 1024)
    liar.store._cache.clear()
    assert await c.get(blob_id, providers=[planes[0].peer_id, planes[1].peer_id], timeout_s=30) == data
    assert planes[0].peer_id not in c.stats()["fetched_bytes_by_provider"]


async def test_interrupted_fetch_resumes_where_it_stopped_after_a_restart(make_group, tmp_path) -> None:
    _, planes = await make_group(2)
    a, b = services(planes, tmp_path, chunk_bytes=32 * 1024, parallel=1)
    data = os.urandom(1_000_000)
    blob_id = await a.put(data)
    original = a._on_get

    async def slow_get(peer, meta, tensors):  # ~1.5 s for the blob: the cancel lands mid-fetch
        await asyncio.sleep(0.05)
        return await original(peer, meta, tensors)

    planes[0].serve("/hyphae/blob/get", slow_get)
    task = asyncio.ensure_future(b.get(blob_id, providers=[planes[0].peer_id], timeout_s=30))
    await wait_for(lambda: len(b.store.held(blob_id)) >= 5, 20, "a few chunks fetched")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.3)  # a chunk already being written to disk (in a thread) lands or not
    kept = b.store.held(blob_id)
    restarted = BlobService(planes[1], BlobConfig(directory=tmp_path / "blobs-1", chunk_bytes=32 * 1024))
    assert restarted.store.held(blob_id) == kept
    served_before = a.served_bytes
    assert await restarted.get(blob_id, providers=[planes[0].peer_id], timeout_s=30) == data
    assert a.served_bytes - served_before <= len(data) - len(kept) * 32 * 1024 + 32 * 1024


async def _swarm(make_group, tmp_path, size: int, chunk: int, joiners: int = 6) -> None:
    hosts, planes = await make_group(1 + joiners)
    svcs = services(planes, tmp_path, chunk_bytes=chunk)
    data = np.random.default_rng(5).integers(0, 256, size, dtype=np.uint8).tobytes()
    blob_id = await svcs[0].put(data)
    origin = planes[0]
    sent_before = sum(origin.stats()["bytes_sent"].values())
    start = time.monotonic()
    got = await asyncio.gather(*(s.get(blob_id, timeout_s=150) for s in svcs[1:]))
    elapsed = time.monotonic() - start
    assert all(g == data for g in got)
    origin_upload = sum(origin.stats()["bytes_sent"].values()) - sent_before
    peer_served = sum(s.served_bytes for s in svcs[1:])
    print(f"{joiners} joiners x {size >> 20} MiB in {elapsed:.1f} s: origin uploaded {origin_upload / size:.2f}x "
          f"the blob, joiners served each other {peer_served / size:.2f}x")
    assert peer_served > 0, "joiners did not serve each other"
    assert origin_upload < 3 * size, f"origin uploaded {origin_upload / size:.2f}x the blob"


async def test_six_joiners_serve_each_other_and_spare_the_origin(make_group, tmp_path) -> None:
    await _swarm(make_group, tmp_path, 16 << 20, 256 * 1024)


@pytest.mark.slow
@pytest.mark.timeout(400)
async def test_100_mib_blob_to_six_joiners_costs_the_origin_under_3x(make_group, tmp_path) -> None:
    await _swarm(make_group, tmp_path, 100 << 20, 1 << 20)


def _files_of(folder, blob_id: str) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if blob_id in str(p))


async def test_removing_one_blob_deletes_it_and_stops_serving_it_while_another_is_being_fetched(
        make_group, tmp_path) -> None:
    _, planes = await make_group(3)
    a, b, c = services(planes, tmp_path, chunk_bytes=32 * 1024, parallel=1)
    a_peer, b_peer = planes[0].peer_id, planes[1].peer_id
    gone, kept = os.urandom(300_000), os.urandom(1_000_000)
    gone_id, kept_id = await a.put(gone), await a.put(kept)
    assert await b.get(gone_id, providers=[a_peer], timeout_s=30) == gone
    original = a._on_get

    async def slow_get(peer, meta, tensors):  # ~0.6 s for the kept blob: the remove lands mid-fetch
        await asyncio.sleep(0.02)
        return await original(peer, meta, tensors)

    planes[0].serve("/hyphae/blob/get", slow_get)
    fetch = asyncio.ensure_future(c.get(kept_id, providers=[a_peer], timeout_s=30))
    await wait_for(lambda: len(c.store.held(kept_id)) >= 3, 20, "a few chunks of the kept blob fetched")
    assert not fetch.done()
    assert await a.remove(gone_id) is True
    assert not a.has(gone_id) and _files_of(tmp_path / "blobs-0", gone_id) == []
    assert await fetch == kept  # the other blob, being served meanwhile, is untouched
    assert a.has(kept_id) and await a.remove(gone_id) is False
    reply = await planes[2].request(a_peer, "/hyphae/blob/have", {"id": gone_id})
    assert reply.meta["known"] is False and not reply.tensors
    served = a.served_bytes
    assert await c.get(gone_id, providers=[a_peer, b_peer], timeout_s=30) == gone
    assert a.served_bytes == served and c.stats()["fetched_bytes_by_provider"][b_peer] == len(gone)


async def test_removing_a_blob_while_serving_it_sends_its_fetcher_to_the_other_holder(make_group, tmp_path) -> None:
    _, planes = await make_group(3)
    a, b, c = services(planes, tmp_path, chunk_bytes=32 * 1024, parallel=2, per_provider=1)
    a_peer, b_peer = planes[0].peer_id, planes[1].peer_id
    data = os.urandom(2_000_000)
    blob_id = await a.put(data)
    assert await b.put(data) == blob_id

    def slowed(service: BlobService):  # both serve ~20 chunks/s: the fetch takes ~1.5 s
        async def slow_get(peer, meta, tensors):
            await asyncio.sleep(0.05)
            return await service._on_get(peer, meta, tensors)
        return slow_get

    planes[0].serve("/hyphae/blob/get", slowed(a))
    planes[1].serve("/hyphae/blob/get", slowed(b))
    fetch = asyncio.ensure_future(c.get(blob_id, providers=[a_peer, b_peer], timeout_s=60))
    await wait_for(lambda: a.served_bytes >= 3 * 32 * 1024, 20, "a has served a few chunks")
    assert await a.remove(blob_id) is True
    served_at_removal = a.served_bytes
    assert await fetch == data
    assert a.served_bytes - served_at_removal <= 32 * 1024  # at most the one chunk already being read
    assert _files_of(tmp_path / "blobs-0", blob_id) == [] and not a.has(blob_id)
