"""The daemon's Comm blobs between real hosts keep within a budget: the least recently used are
deleted (local file, tensor-plane copy, and this node's run-state record), and whatever is
still recorded can be fetched again from the node that still holds it."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from hyphae.node.comm_backend import ALGO_SECTION, BlobBudget, CommBackend, CommFailure
from hyphae.protocol.host import Host
from hyphae.protocol.runstate.state import RunState
from hyphae.protocol.tensor import TensorPlane
from hyphae.protocol.tensor.blobs import BlobConfig, BlobService

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class PlaneBlobs:
    """The blob calls of the daemon's tensor service (node/tensor_service.py), on a real BlobService."""

    def __init__(self, blobs: BlobService) -> None:
        self.blobs = blobs

    async def put_blob(self, data: bytes) -> str:
        return await self.blobs.put(data)

    async def get_blob(self, blob_id: str, timeout_s: float) -> bytes:
        return await self.blobs.get(blob_id, timeout_s=timeout_s)


def node(host: Host, plane: TensorPlane, root: Path, budget: BlobBudget) -> CommBackend:
    services = {"tensor": PlaneBlobs(BlobService(plane, BlobConfig(directory=root / "blobs", chunk_bytes=16 * 1024))),
                "runstate": SimpleNamespace(state=RunState("budget", host.identity))}
    daemon = SimpleNamespace(host=host, config=SimpleNamespace(host=SimpleNamespace(network="net")),
                             datadir=SimpleNamespace(root=root), service=services.get)
    backend = CommBackend(daemon)
    backend.blob_budget = budget
    return backend


def local(b: CommBackend) -> set[str]:
    return {p.name for p in b.blob_dir.iterdir() if not p.name.startswith(".")}


def plane_copies(b: CommBackend) -> set[str]:
    return {p.stem for p in (b.blob_dir.parent).glob("*.blob")}


def own_records(b: CommBackend) -> dict[str, str]:
    state = b._run_state()
    return {k: v["v"]["id"] for k, v in state.value(ALGO_SECTION, state.peer_id).items() if k.startswith("blob/")}


def replicate(src: CommBackend, dst: CommBackend) -> None:
    dst._run_state().receive(src._run_state().envelopes())


async def test_puts_keep_the_budget_and_drop_their_records_and_the_newest_is_fetched_by_others(
        make_group, tmp_path) -> None:
    hosts, planes = await make_group(2)
    a = node(hosts[0], planes[0], tmp_path / "a", BlobBudget(max_blobs=4, max_bytes=1 << 20))
    b = node(hosts[1], planes[1], tmp_path / "b", BlobBudget(max_blobs=1, max_bytes=1 << 20))
    base_data = os.urandom(50_000)  # as ZO's θ_0: put once, named by every snapshot record
    base = await a.put_blob(base_data)
    await a.state_set(f"zo/snapshot/0/{a.peer_id}", {"step": 0, "hash": base, "base": base})
    blobs = [os.urandom(50_000) for _ in range(10)]
    names = []
    for data in blobs:
        names.append(await a.put_blob(data))
        assert len(local(a)) <= 4 and len(plane_copies(a)) <= 4 and len(own_records(a)) <= 4
    assert local(a) == {base, *names[-3:]}  # the named one is kept whatever its age
    assert set(own_records(a)) == {f"blob/{n}" for n in (base, *names[-3:])}
    assert plane_copies(a) == set(own_records(a).values())
    await a.state_set(f"zo/snapshot/0/{a.peer_id}", None)  # no longer named: the next put deletes it
    blobs.append(os.urandom(50_000))
    names.append(await a.put_blob(blobs[-1]))
    assert base not in local(a) and f"blob/{base}" not in own_records(a) and len(local(a)) == 4

    replicate(a, b)
    assert await b.get_blob(names[-1], timeout_s=30) == blobs[-1]
    with pytest.raises(CommFailure) as gone:
        await b.get_blob(names[0], timeout_s=5)  # deleted with its record: nobody can name it
    assert gone.value.kind == "BlobUnavailable"

    # b keeps one blob: fetching another deletes its copy of the first, but not a's record of it,
    # so the first is fetched again from a
    assert await b.get_blob(names[-2], timeout_s=30) == blobs[-2]
    assert local(b) == {names[-2]} and plane_copies(b) == {own_records(a)[f"blob/{names[-2]}"]}
    assert f"blob/{names[-1]}" in b._run_state().newest(ALGO_SECTION, "blob/")
    assert await b.get_blob(names[-1], timeout_s=30) == blobs[-1]
    assert local(b) == {names[-1]}
