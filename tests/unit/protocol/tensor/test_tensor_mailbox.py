"""The mailbox's budgets: per node and per sending peer, and every path that gives bytes back."""

from __future__ import annotations

import asyncio

import pytest

from hyphae.protocol.errors import BusyError
from hyphae.protocol.tensor._mailbox import Mailbox


def _fill(box: Mailbox, peer: str, tag: str, nbytes: int) -> None:
    counted = box.reserve(peer, tag, nbytes)
    box.put(peer, tag, f"{peer}:{tag}", nbytes, counted)


def test_one_peer_is_refused_at_its_share_while_another_still_fits() -> None:
    box = Mailbox(max_unclaimed_bytes=100, ttl_s=60, max_unclaimed_bytes_per_peer=40)
    _fill(box, "a", "t1", 40)
    with pytest.raises(BusyError, match="limit 40 per peer"):
        box.reserve("a", "t2", 1)
    _fill(box, "b", "t1", 40)
    assert (box.unclaimed_by("a"), box.unclaimed_by("b"), box.unclaimed_bytes) == (40, 40, 80)
    with pytest.raises(BusyError, match="limit 100:"):  # the node's total still holds
        box.reserve("c", "t1", 21)


def test_claims_expiry_purge_and_unreserve_give_each_peer_its_bytes_back() -> None:
    box = Mailbox(max_unclaimed_bytes=100, ttl_s=10, max_unclaimed_bytes_per_peer=50)
    _fill(box, "a", "op/1", 30)
    _fill(box, "a", "other", 10)
    _fill(box, "b", "op/2", 20)
    assert asyncio.run(box.get("a", "other")) == "a:other"
    assert box.unclaimed_by("a") == 30
    assert box.purge("op/") == 2 and box.unclaimed_bytes == 0
    _fill(box, "b", "late", 5)
    assert box.expire(now=10**9) == 1
    box.unreserve("a", 7, box.reserve("a", "broken", 7))  # a transfer that broke mid-way
    assert box.unclaimed_bytes == 0 and box.unclaimed_by("a") == box.unclaimed_by("b") == 0


def test_a_transfer_someone_waits_for_costs_no_budget() -> None:
    async def body() -> None:
        box = Mailbox(max_unclaimed_bytes=10, ttl_s=60, max_unclaimed_bytes_per_peer=10)
        waiter = asyncio.ensure_future(box.get("a", "t"))
        await asyncio.sleep(0)
        counted = box.reserve("a", "t", 1000)
        box.put("a", "t", "x", 1000, counted)
        assert await waiter == "x" and box.unclaimed_bytes == 0

    asyncio.run(body())
