"""SimNetwork/SimComm: all-reduce with failures, exchange, scalars, blobs, state, bytes, time."""

import asyncio
import time

import pytest
import torch

from hyphae.training import (
    BlobCorrupt,
    BlobUnavailable,
    CommClosed,
    PeerUnavailable,
    SimNetwork,
    Traffic,
    run_virtual,
)


def test_virtual_clock_makes_long_latencies_free() -> None:
    async def main() -> tuple[float, float]:
        net = SimNetwork(latency_s=30.0)
        a, b = net.add_peers(2)
        t0 = a.now()
        await asyncio.gather(
            a.exchange(b.peer_id, {"x": torch.ones(2)}, tag="t", timeout_s=100),
            b.exchange(a.peer_id, {"x": torch.zeros(2)}, tag="t", timeout_s=100),
        )
        return t0, a.now()

    wall = time.perf_counter()
    t0, t1 = run_virtual(main())
    assert t1 - t0 == pytest.approx(30.0)
    assert time.perf_counter() - wall < 1.0


def test_all_reduce_mean_reaches_everyone_bit_identical() -> None:
    async def main():
        net = SimNetwork()
        comms = net.add_peers(5)
        group = net.members()
        return await asyncio.gather(*(
            c.all_reduce({"w": torch.full((3,), float(i)), "b": torch.tensor(i, dtype=torch.float64)},
                         group=group, tag="r0", timeout_s=5)
            for i, c in enumerate(comms)
        ))

    results = run_virtual(main())
    for r in results:
        assert torch.equal(r.tensors["w"], torch.full((3,), 2.0))
        assert r.tensors["b"].dtype == torch.float64 and r.tensors["b"].item() == 2.0
        assert r.included == tuple(f"peer-{i:04d}" for i in range(5))
    assert results[0].tensors["w"].data_ptr() != results[1].tensors["w"].data_ptr()


def test_all_reduce_with_a_peer_killed_mid_way_finishes_with_the_mean_of_the_rest() -> None:
    async def main():
        net = SimNetwork(latency_s=0.01)
        comms = net.add_peers(4)
        group = net.members()

        async def contribute(i: int):
            if i == 3:
                await comms[i].sleep(10.0)  # the slow one is killed at t = 1 before contributing
            return await comms[i].all_reduce({"x": torch.tensor([float(i)])}, group=group, tag="k", timeout_s=60)

        net.kill("peer-0003", at_s=comms[0].now() + 1.0)
        t0 = comms[0].now()
        results = await asyncio.gather(*(contribute(i) for i in range(4)), return_exceptions=True)
        return results, comms[0].now() - t0

    results, elapsed = run_virtual(main())
    assert isinstance(results[3], CommClosed)
    for r in results[:3]:
        assert r.tensors["x"].item() == 1.0  # mean of 0, 1, 2
        assert r.included == ("peer-0000", "peer-0001", "peer-0002")
    assert elapsed < 5.0  # closed at the kill, not at the 60 s deadline


def test_straggler_is_excluded_at_the_deadline_and_still_receives_the_result() -> None:
    async def main():
        net = SimNetwork()
        a, b, c = net.add_peers(3)
        group = net.members()

        async def late():
            await c.sleep(20.0)
            return await c.all_reduce({"x": torch.tensor([9.0])}, group=group, tag="r", timeout_s=5)

        return await asyncio.gather(
            a.all_reduce({"x": torch.tensor([1.0])}, group=group, tag="r", timeout_s=5),
            b.all_reduce({"x": torch.tensor([3.0])}, group=group, tag="r", timeout_s=5),
            late(),
        )

    ra, rb, rc = run_virtual(main())
    assert ra.tensors["x"].item() == rb.tensors["x"].item() == rc.tensors["x"].item() == 2.0
    assert rc.included == ("peer-0000", "peer-0001")


def test_cancelled_contributor_is_withdrawn_and_the_others_finish_without_it() -> None:
    async def main():
        net = SimNetwork()
        a, b, c = net.add_peers(3)
        group = net.members()
        task = asyncio.create_task(c.all_reduce({"x": torch.tensor([100.0])}, group=group, tag="r", timeout_s=50))
        await asyncio.sleep(1)
        task.cancel()
        await asyncio.sleep(1)
        return await asyncio.gather(
            a.all_reduce({"x": torch.tensor([1.0])}, group=group, tag="r", timeout_s=50),
            b.all_reduce({"x": torch.tensor([3.0])}, group=group, tag="r", timeout_s=50),
        )

    ra, _ = run_virtual(main())
    assert ra.tensors["x"].item() == 2.0 and ra.included == ("peer-0000", "peer-0001")


def test_all_reduce_rejects_mismatched_layouts_and_outsiders() -> None:
    async def main():
        net = SimNetwork()
        a, b = net.add_peers(2)
        group = net.members()
        first = asyncio.create_task(a.all_reduce({"x": torch.ones(2)}, group=group, tag="r", timeout_s=1))
        await asyncio.sleep(0)
        with pytest.raises(ValueError, match="do not match"):
            await b.all_reduce({"x": torch.ones(3)}, group=group, tag="r", timeout_s=1)
        with pytest.raises(ValueError, match="must contain this peer"):
            await b.all_reduce({"x": torch.ones(2)}, group=["peer-0000"], tag="s", timeout_s=1)
        with pytest.raises(ValueError, match="op='sum'"):
            await b.all_reduce({"n": torch.ones(2, dtype=torch.int64)}, group=group, tag="t", timeout_s=1)
        return await first

    assert run_virtual(main()).included == ("peer-0000",)


def test_ring_all_reduce_counts_two_n_minus_one_over_n_payloads_per_peer() -> None:
    async def main():
        net = SimNetwork()
        comms = net.add_peers(4)
        group = net.members()
        await asyncio.gather(*(
            c.all_reduce({"x": torch.zeros(1000)}, group=group, tag="r", timeout_s=1) for c in comms
        ))
        return [c.traffic() for c in comms]

    expected = 2 * 3 * 4000 // 4
    assert run_virtual(main()) == [Traffic(expected, expected)] * 4


def test_two_hundred_peer_all_reduce_of_a_small_tensor_is_fast() -> None:
    async def main():
        net = SimNetwork(latency_s=0.05)
        comms = net.add_peers(200)
        group = net.members()
        return await asyncio.gather(*(
            c.all_reduce({"x": torch.full((256,), float(i))}, group=group, tag="big", timeout_s=60)
            for i, c in enumerate(comms)
        ))

    start = time.perf_counter()
    results = run_virtual(main())
    assert time.perf_counter() - start < 2.0
    assert len(results[0].included) == 200
    assert all(r.tensors["x"][0].item() == 99.5 for r in results)


def test_exchange_swaps_private_copies_and_counts_bytes() -> None:
    async def main():
        net = SimNetwork()
        a, b = net.add_peers(2)
        sent_a, sent_b = {"v": torch.ones(4)}, {"v": torch.zeros(4), "w": torch.zeros(2, dtype=torch.float16)}
        got_a, got_b = await asyncio.gather(
            a.exchange(b.peer_id, sent_a, tag="x", timeout_s=1),
            b.exchange(a.peer_id, sent_b, tag="x", timeout_s=1),
        )
        got_b["v"].add_(5)  # must not touch a's tensor
        return sent_a, got_a, got_b, a.traffic(), b.traffic()

    sent_a, got_a, got_b, ta, tb = run_virtual(main())
    assert torch.equal(sent_a["v"], torch.ones(4))
    assert set(got_a) == {"v", "w"} and torch.equal(got_a["v"], torch.zeros(4))
    assert ta == Traffic(sent_bytes=16, received_bytes=20) and tb == Traffic(20, 16)


def test_exchange_failures_are_peer_unavailable_or_timeout() -> None:
    async def main():
        net = SimNetwork()
        a, b, c = net.add_peers(3)
        net.kill(c.peer_id)
        with pytest.raises(PeerUnavailable):
            await a.exchange(c.peer_id, {}, tag="x", timeout_s=1)
        with pytest.raises(TimeoutError):
            await a.exchange(b.peer_id, {"v": torch.ones(1)}, tag="never", timeout_s=1)
        net.kill(b.peer_id, at_s=a.now() + 1)
        with pytest.raises(PeerUnavailable):
            await a.exchange(b.peer_id, {"v": torch.ones(1)}, tag="y", timeout_s=10)
        with pytest.raises(CommClosed):
            await b.members()

    run_virtual(main())


def test_collect_returns_what_arrived_before_the_deadline() -> None:
    async def main():
        net = SimNetwork(latency_s=0.1)
        comms = net.add_peers(4)
        peers = net.members()
        for c in comms[:3]:
            await c.publish("zo", 7, b"\x42")
        partial = await comms[0].collect("zo", 7, peers=peers, timeout_s=2)
        await comms[3].publish("zo", 7, b"\x01")
        full = await comms[1].collect("zo", 7, peers=peers, timeout_s=2)
        return partial, full, comms[1].traffic()

    partial, full, traffic = run_virtual(main())
    assert partial == {p: b"\x42" for p in ("peer-0000", "peer-0001", "peer-0002")}
    assert len(full) == 4 and full["peer-0003"] == b"\x01"
    assert traffic == Traffic(sent_bytes=1, received_bytes=3)


def test_publish_refuses_payloads_that_belong_in_a_blob() -> None:
    async def main():
        (a,) = SimNetwork().add_peers(1)
        with pytest.raises(ValueError, match="put_blob"):
            await a.publish("t", 0, b"x" * 2000)

    run_virtual(main())


def test_blobs_are_content_addressed_verified_and_served_by_live_holders() -> None:
    async def main():
        net = SimNetwork()
        a, b, c = net.add_peers(3)
        digest = await a.put_tensors({"w": torch.arange(6.0).view(2, 3)})
        got = await b.get_tensors(digest, timeout_s=1)
        assert torch.equal(got["w"], torch.arange(6.0).view(2, 3))
        net.kill(a.peer_id)
        await c.get_blob(digest, timeout_s=1)  # b holds it now
        assert c.traffic().received_bytes > 24 and b.traffic().sent_bytes > 24
        lonely = await c.put_blob(b"only c has this")
        net.corrupt_blob(lonely)
        with pytest.raises(BlobCorrupt):
            await b.get_blob(lonely, timeout_s=1)
        net.kill(c.peer_id)
        with pytest.raises(BlobUnavailable):
            await b.get_blob("0" * 64, timeout_s=1)

    run_virtual(main())


def test_run_state_holds_plain_copies_and_rejects_objects() -> None:
    async def main():
        a, b = SimNetwork().add_peers(2)
        value = {"owner": "peer-0000", "experts": [0, 1]}
        await a.state_set("spes/owner/0", value)
        value["experts"].append(99)
        assert await b.state_get("spes/owner/0") == {"owner": "peer-0000", "experts": [0, 1]}
        assert list(await b.state_items("spes/")) == ["spes/owner/0"]
        await b.state_set("spes/owner/0", None)
        assert await a.state_get("spes/owner/0") is None
        with pytest.raises(ValueError, match="run-state values"):
            await a.state_set("bad", torch.ones(1))

    run_virtual(main())


def test_members_are_sorted_and_leaving_is_idempotent() -> None:
    async def main():
        net = SimNetwork()
        comms = [net.add_peer(pid) for pid in ("c", "a", "b")]
        assert await comms[0].members() == ["a", "b", "c"]
        await comms[1].aclose()
        await comms[1].aclose()
        assert await comms[0].members() == ["b", "c"]

    run_virtual(main())


def test_a_thousand_peers_exchange_one_byte_scalars_in_well_under_a_second_per_step() -> None:
    async def main():
        net = SimNetwork(latency_s=0.05)
        comms = net.add_peers(1000)
        peers = net.members()

        async def one(c):
            await c.publish("zo", 0, bytes([c.peer_id.__hash__() & 0xFF]))
            return await c.collect("zo", 0, peers=peers, timeout_s=5)

        clock = asyncio.get_running_loop()
        start = clock.time()
        results = await asyncio.gather(*(one(c) for c in comms))
        return results, comms[0].traffic(), clock.time() - start

    # On the simulated clock (wall time is the machine's load, and tests check behaviour).
    results, traffic, elapsed = run_virtual(main())
    assert elapsed < 1.0, elapsed
    assert all(len(r) == 1000 for r in results)
    assert traffic == Traffic(sent_bytes=1, received_bytes=999)
