"""Group all-reduce over real hosts: correct mean/sum, and members that die mid-way are excluded
while the others finish with the reduction over the rest."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from hyphae.protocol.errors import ClosedError
from hyphae.protocol.tensor import Tensor
from hyphae.protocol.tensor.codecs import bf16_to_f32, f32_to_bf16

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

_tags = itertools.count()


def inputs(rank: int, sizes=(50_000, 3, 7_001)) -> list[Tensor]:
    rng = np.random.default_rng(100 + rank)
    return [Tensor.from_numpy(f"t{i}", rng.standard_normal(n).astype(np.float32).reshape(-1, 1))
            for i, n in enumerate(sizes)]


def expected(ranks: list[int], op: str = "mean") -> list[np.ndarray]:
    out = []
    for i in range(3):
        acc = sum(inputs(r)[i].numpy().astype(np.float64) for r in ranks)
        out.append((acc / len(ranks) if op == "mean" else acc).astype(np.float32))
    return out


async def test_four_members_reduce_to_the_exact_mean_and_sum(make_group) -> None:
    hosts, planes = await make_group(4)
    members = [p.peer_id for p in planes]
    for op in ("mean", "sum"):
        tag = f"r{next(_tags)}"
        results = await asyncio.gather(*(p.all_reduce(members, tag, inputs(i), op=op, timeout_s=30)
                                         for i, p in enumerate(planes)))
        want = expected([0, 1, 2, 3], op)
        for res in results:
            assert res.included == tuple(sorted(members)) and res.epochs == 1
            for got, w in zip(res.tensors, want):
                assert got.spec.shape == w.shape
                np.testing.assert_allclose(got.numpy(), w, rtol=1e-6, atol=1e-6)
        assert all(r.tensors[0].data == results[0].tensors[0].data for r in results)  # same bits everywhere


async def test_bf16_all_reduce(make_group) -> None:
    _, planes = await make_group(3)
    members = [p.peer_id for p in planes]
    xs = [f32_to_bf16(np.random.default_rng(i).standard_normal(1000).astype(np.float32)) for i in range(3)]
    results = await asyncio.gather(*(p.all_reduce(members, "bf", [Tensor.from_numpy("w", x, dtype="bfloat16")],
                                                  timeout_s=30) for p, x in zip(planes, xs)))
    want = np.mean([bf16_to_f32(x).astype(np.float64) for x in xs], axis=0)
    got = bf16_to_f32(results[0].tensors[0].numpy())
    assert results[0].tensors[0].spec.dtype == "bfloat16"
    assert np.max(np.abs(got - want)) <= np.max(np.abs(want)) * 2**-7


async def _kill(host, plane) -> None:
    await plane.aclose()
    await host.aclose()


def _dies_when(plane, host, should_die, kills: list) -> None:
    """Make ``plane`` close itself and its host when a send matches ``should_die(tag, n)``, as a
    crashed process would (the kill is shielded: cancelling the dying member does not stop it)."""
    original = plane.send
    count = itertools.count(1)

    async def send(peer_id, tag, tensors, **kw):
        if should_die(tag, next(count)):
            if not kills:
                kills.append(asyncio.ensure_future(_kill(host, plane)))
            await asyncio.shield(kills[0])
            raise ClosedError("killed by the test")
        return await original(peer_id, tag, tensors, **kw)

    plane.send = send


async def _run_with_victim(make_group, should_die):
    hosts, planes = await make_group(4)
    members = [p.peer_id for p in planes]
    victim = 3
    kills: list = []
    _dies_when(planes[victim], hosts[victim], should_die, kills)
    tag = f"kill{next(_tags)}"
    survivors = [i for i in range(4) if i != victim]

    async def member(i):
        try:
            return await planes[i].all_reduce(members, tag, inputs(i), timeout_s=40)
        except ClosedError:
            assert i == victim
            return None

    results = await asyncio.gather(*(member(i) for i in range(4)))
    await asyncio.gather(*kills)
    assert kills, "the victim never reached the point where it dies"
    want = expected(survivors)
    included = tuple(sorted(members[i] for i in survivors))
    for i in survivors:
        res = results[i]
        assert res.included == included, (i, res.included)
        for got, w in zip(res.tensors, want):
            np.testing.assert_allclose(got.numpy(), w, rtol=1e-6, atol=1e-6)
    return [results[i] for i in survivors]


async def test_member_killed_during_reduce_scatter_is_excluded_and_the_rest_finish(make_group) -> None:
    # The victim delivers its first part, then dies while sending the others.
    results = await _run_with_victim(make_group, lambda tag, n: tag.endswith("/p") and n == 2)
    assert all(r.epochs == 1 for r in results)


async def test_member_killed_after_voting_has_its_chunk_rerun_among_survivors(make_group) -> None:
    # The victim takes part in reduce-scatter and the vote, then dies before sending its chunk.
    results = await _run_with_victim(make_group, lambda tag, n: "/0/r" in tag)
    assert all(r.epochs == 2 for r in results)
