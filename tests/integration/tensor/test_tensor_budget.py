"""Budgets sized from the model between real hosts: a full-state transfer over the configured
floor is refused until the receiver learns the model's size, then accepted (on the data
connection already open too); a blob over the blob limit is refused with a message that says
why, before a single chunk is fetched, and fetched once the limit is sized from the model."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hyphae.protocol.tensor import BlobTooLarge, Refused, Tensor, budget_for_state
from hyphae.protocol.tensor.blobs import BlobConfig, BlobService

from .conftest import same

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MiB = 1 << 20


def state(nbytes: int, seed: int = 0) -> list[Tensor]:
    """A model-sized payload (a pseudo-gradient) of ``nbytes`` in two float32 tensors."""
    x = np.random.default_rng(seed).standard_normal(nbytes // 4, dtype=np.float32)
    return [Tensor.from_numpy("w1", x[: len(x) // 2]), Tensor.from_numpy("w2", x[len(x) // 2:])]


async def test_an_early_full_state_transfer_fits_once_the_budget_is_sized_from_the_model(make_group, make_plane) -> None:
    hosts, _ = await make_group(2)
    a = await make_plane(hosts[0])
    b = await make_plane(hosts[1], max_transfer_bytes=MiB, max_unclaimed_bytes=2 * MiB,
                         max_unclaimed_bytes_per_peer=MiB)  # a floor far below the model
    model = state(3 * MiB)
    with pytest.raises(Refused, match=f"limit {MiB}"):
        await a.send(b.peer_id, "pg-0", model)  # arrives before b asked: nobody waits for it
    small = state(64 * 1024, seed=1)
    await a.send(b.peer_id, "warm", small)  # a fresh data connection, open from here on
    assert same(await b.recv(a.peer_id, "warm"), small)
    opened = sum(b.stats()["peers"][a.peer_id]["opened_by_path"].values())

    b.set_budget(budget_for_state(3 * MiB, b.budget))  # the daemon learnt the model's size
    assert b.budget.max_unclaimed_bytes_per_peer >= 3 * MiB and b.budget.state_bytes == 3 * MiB
    await a.send(b.peer_id, "pg-1", model)  # early again, and unclaimed: within the new share
    assert same(await b.recv(a.peer_id, "pg-1"), model)
    assert sum(b.stats()["peers"][a.peer_id]["opened_by_path"].values()) == opened  # the open connection took it
    with pytest.raises(Refused, match="limit"):
        await a.send(b.peer_id, "twice-the-model", state(8 * MiB))  # over 1.25 x the state: still refused


async def test_a_blob_over_the_budget_is_refused_before_any_chunk_then_fetched_once_sized(make_group, tmp_path) -> None:
    _, planes = await make_group(2)
    seed = BlobService(planes[0], BlobConfig(directory=tmp_path / "seed", chunk_bytes=256 * 1024))
    joiner = BlobService(planes[1], BlobConfig(directory=tmp_path / "joiner", max_blob_bytes=MiB))
    data = os.urandom(3 * MiB)
    blob_id = await seed.put(data)
    with pytest.raises(BlobTooLarge, match=f"is {len(data)} bytes, over this node's limit of {MiB} bytes") as refused:
        await joiner.get(blob_id, providers=[planes[0].peer_id], timeout_s=30)
    assert "the default" in str(refused.value)
    assert seed.served_bytes == 0 and not (tmp_path / "joiner" / "partial" / blob_id).exists()
    budget = budget_for_state(len(data), planes[1].budget)
    joiner.set_max_blob_bytes(budget.max_blob_bytes, "a model state of 3 MiB")
    assert await joiner.get(blob_id, providers=[planes[0].peer_id], timeout_s=30) == data
