"""The daemon's side of its workers' `Comm`: each call a worker makes is answered here.

Tensors arrive as raw bytes in shared memory (name -> (dtype, shape, bytes)) and leave the same
way; nothing here imports torch. What each call does on the network:

* ``members``: this node plus every connected hyphae peer whose hello says it trains.
* ``publish``/``collect``: small values over the network's scalar pubsub topic.
* ``exchange``/``all_reduce``: through the tensor plane (:mod:`.tensor_service`); a group of
  just this node is reduced locally.
* ``put_blob``/``get_blob``: named by sha256 for the Comm; stored locally and in the tensor
  plane's blob service, whose manifest id the run state maps from the sha256, so any peer can
  fetch (from every holder at once) and verify it.
* ``state_*``: the run state's ``algo`` section (each member writes its own entries; a read
  merges everyone's, newest write winning).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgpack
import numpy as np

from hyphae.protocol.atomic import atomic_write_bytes
from hyphae.protocol.errors import ProtocolViolation
from hyphae.protocol.runstate import WriteRejected
from hyphae.protocol.wire import decode_body, expect_map

from .tensor_bytes import from_float64, to_float64

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["CommBackend", "CommFailure", "Tensors", "Collectives"]

log = logging.getLogger(__name__)

Tensors = dict[str, tuple[str, tuple[int, ...], np.ndarray]]
"""name -> (dtype, shape, raw bytes as a uint8 array)."""

SCALAR_RETENTION_STEPS = 1024
MAX_SCALAR_BYTES = 1024


class CommFailure(Exception):
    """An expected failure to report to the worker as the Comm exception ``kind``."""

    def __init__(self, kind: str, message: str, peer: str = "") -> None:
        super().__init__(message)
        self.kind, self.peer = kind, peer


class Collectives(Protocol):
    """Multi-peer tensor operations (the tensor plane implements these)."""

    async def exchange(self, peer: str, tag: str, tensors: Tensors, timeout_s: float) -> Tensors: ...

    async def all_reduce(self, group: list[str], tag: str, tensors: Tensors, op: str,
                         timeout_s: float) -> tuple[Tensors, list[str]]: ...


def reduce_locally(contributions: list[Tensors], op: str) -> Tensors:
    """Mean or sum of contributions in float64, cast back; the same input gives the same bits."""
    first = contributions[0]
    out: Tensors = {}
    for name, (dtype, shape, _) in first.items():
        total = np.zeros(int(np.prod(shape)) if shape else 1, dtype=np.float64)
        for contrib in contributions:
            total += to_float64(contrib[name][2], dtype)
        if op == "mean":
            total /= len(contributions)
        out[name] = (dtype, shape, from_float64(total, dtype))
    return out


class CommBackend:
    """Answers worker Comm calls for one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.blob_dir: Path = daemon.datadir.root / "blobs" / "local"
        self._state: dict[str, Any] = {}
        self._scalars: dict[tuple[str, int], dict[str, bytes]] = defaultdict(dict)
        self._scalar_event = asyncio.Event()
        self._topic = f"/hyphae/scalars/{daemon.config.host.network}/1"

    @property
    def peer_id(self) -> str:
        return self.daemon.host.peer_id

    async def start(self) -> None:
        await self.daemon.host.subscribe(self._topic, self._on_scalar)

    # ---- membership ------------------------------------------------------------------------

    @property
    def collectives(self) -> Collectives | None:
        return self.daemon.service("tensor")  # type: ignore[return-value]

    async def members(self) -> list[str]:
        """Live trainers of the run (from the replicated run state), this node included.

        Without a tensor plane nobody else could take part in a round, so then it is this node
        alone; without a run state, the connected peers whose hello says they train."""
        if self.collectives is None:
            return [self.peer_id]
        state = self._run_state()
        if state is not None:
            members = state.members()
            trainers = {p for p in state.live_members() if "trainer" in members.get(p, {}).get("roles", [])}
        else:
            trainers = {p.peer_id for p in await self.daemon.host.peers() if "trainer" in p.roles}
        return sorted(trainers | {self.peer_id})

    # ---- tensors ---------------------------------------------------------------------------

    async def exchange(self, peer: str, tag: str, tensors: Tensors, timeout_s: float) -> Tensors:
        if self.collectives is None:
            raise CommFailure("PeerUnavailable", "this node has no tensor plane", peer)
        return await self.collectives.exchange(peer, tag, tensors, timeout_s)

    async def all_reduce(self, group: list[str], tag: str, tensors: Tensors, op: str,
                         timeout_s: float) -> tuple[Tensors, list[str]]:
        if op not in ("mean", "sum"):
            raise CommFailure("ValueError", f"op must be 'mean' or 'sum', got {op!r}")
        if group == [self.peer_id]:
            return reduce_locally([tensors], op), [self.peer_id]
        if self.collectives is None:
            raise CommFailure("PeerUnavailable", "this node has no tensor plane", group[0])
        return await self.collectives.all_reduce(group, tag, tensors, op, timeout_s)

    # ---- scalars ---------------------------------------------------------------------------

    async def publish(self, topic: str, step: int, value: bytes) -> None:
        if len(value) > MAX_SCALAR_BYTES:
            raise CommFailure("ValueError", f"value is {len(value)} bytes, limit {MAX_SCALAR_BYTES}")
        self._store_scalar(self.peer_id, topic, step, value)
        payload = msgpack.packb({"topic": topic, "step": step, "value": value}, use_bin_type=True)
        await self.daemon.host.publish(self._topic, payload)

    def _on_scalar(self, author: str, data: bytes) -> None:
        try:
            msg = expect_map(decode_body(data), {"topic": str, "step": int, "value": bytes}, what="scalar")
        except ProtocolViolation as exc:
            log.info("dropping a scalar from %s: %s", author, exc)
            return
        if len(msg["value"]) > MAX_SCALAR_BYTES or len(msg["topic"]) > 256:
            log.info("dropping an oversized scalar from %s", author)
            return
        self._store_scalar(author, msg["topic"], msg["step"], msg["value"])

    def _store_scalar(self, author: str, topic: str, step: int, value: bytes) -> None:
        self._scalars[(topic, step)][author] = value
        stale = [k for k in self._scalars if k[0] == topic and k[1] < step - SCALAR_RETENTION_STEPS]
        for key in stale:
            del self._scalars[key]
        self._scalar_event.set()
        self._scalar_event = asyncio.Event()

    async def collect(self, topic: str, step: int, peers: list[str], timeout_s: float) -> dict[str, bytes]:
        want = set(peers)
        try:
            async with asyncio.timeout(timeout_s):
                while not want <= set(self._scalars.get((topic, step), {})):
                    await self._scalar_event.wait()
        except TimeoutError:
            pass  # a partial answer is a normal outcome
        got = self._scalars.get((topic, step), {})
        return {p: v for p, v in got.items() if p in want}

    # ---- blobs -----------------------------------------------------------------------------

    async def put_blob(self, data: bytes) -> str:
        """Store ``data``; its name for the Comm is its sha256.

        The tensor plane names blobs by their chunk manifest (so a fetcher can verify every
        chunk as it arrives); the run state maps the sha256 to that id for everyone."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.blob_dir / digest
        if not path.exists():
            await asyncio.to_thread(atomic_write_bytes, path, data)
        plane, state = self.collectives, self._run_state()
        if plane is not None and state is not None:
            blob_id = await plane.put_blob(data)
            await self.state_set(f"{BLOB_PREFIX}{digest}", {"id": blob_id, "size": len(data)})
        return digest

    async def get_blob(self, digest: str, timeout_s: float) -> bytes:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise CommFailure("ValueError", f"{digest!r} is not a sha256 hex digest")
        path = self.blob_dir / digest
        if path.exists():
            data = await asyncio.to_thread(path.read_bytes)
        else:
            data = await self._fetch_blob(digest, timeout_s)
        if hashlib.sha256(data).hexdigest() != digest:
            raise CommFailure("BlobCorrupt", f"blob {digest} does not hash to its name")
        if not path.exists():
            await asyncio.to_thread(atomic_write_bytes, path, data)
        return data

    async def _fetch_blob(self, digest: str, timeout_s: float) -> bytes:
        record = await self.state_get(f"{BLOB_PREFIX}{digest}")
        plane = self.collectives
        if plane is None or not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise CommFailure("BlobUnavailable", digest)
        try:
            return await plane.get_blob(record["id"], timeout_s)
        except TimeoutError:
            raise CommFailure("TimeoutError", f"blob {digest} not fetched within {timeout_s} s") from None
        except CommFailure:
            raise
        except Exception as exc:  # noqa: BLE001 — no provider, a corrupt one, or a dropped fetch
            raise CommFailure("BlobUnavailable", f"{digest}: {exc}") from None

    # ---- run state -------------------------------------------------------------------------

    def _run_state(self) -> Any:
        svc = self.daemon.service("runstate")
        return None if svc is None else svc.state

    async def state_get(self, key: str) -> Any:
        state = self._run_state()
        if state is None:
            return self._state.get(key)
        return _from_json(state.newest(ALGO_SECTION).get(key))

    async def state_set(self, key: str, value: Any) -> None:
        state = self._run_state()
        if state is None:
            if value is None:
                self._state.pop(key, None)
            else:
                self._state[key] = value
            return
        entry = {"v": _to_json(value), "ts": int(time.time() * 1000)}
        try:
            state.write(ALGO_SECTION, {key: entry})
        except (WriteRejected, ValueError) as exc:
            raise CommFailure("ValueError", f"state_set {key!r}: {exc}") from None

    async def state_items(self, prefix: str) -> dict[str, Any]:
        state = self._run_state()
        if state is None:
            return {k: v for k, v in self._state.items() if k.startswith(prefix)}
        return {k: _from_json(v) for k, v in state.newest(ALGO_SECTION, prefix).items()}


ALGO_SECTION = "algo"
BLOB_PREFIX = "blob/"
_BYTES_TAG = "$bytes"


def _to_json(value: Any) -> Any:
    """Comm values may hold bytes; the run state holds JSON. Bytes travel as ``{"$bytes": hex}``."""
    if isinstance(value, bytes | bytearray):
        return {_BYTES_TAG: bytes(value).hex()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_BYTES_TAG} and isinstance(value[_BYTES_TAG], str):
            return bytes.fromhex(value[_BYTES_TAG])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value

