"""`DaemonComm`: the worker's :class:`~hyphae.training.comm.Comm`, forwarding every call to its
daemon over the IPC socket, tensors through shared memory.

One reader task owns the socket's read side: it matches replies to pending calls by id and
hands a :class:`~.ipc.Stop` to the worker's stop callback. Errors come back by kind and are
raised as the exception types `Comm` documents, so an algorithm's fallbacks work the same
against the daemon as against the simulator.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hyphae.training.comm import (
    AllReduceResult,
    BlobCorrupt,
    BlobUnavailable,
    Comm,
    CommClosed,
    PeerUnavailable,
    ReduceOp,
    Traffic,
    check_plain,
)

from . import ipc
from .shm import Attachments, SegmentPool
from .shm_torch import pack_torch, unpack_torch

__all__ = ["DaemonComm", "raise_remote_error"]

log = logging.getLogger(__name__)


def raise_remote_error(error: Mapping[str, str]) -> None:
    """Re-raise an error the daemon reported, as the Comm exception of that kind."""
    kind, message, peer = error.get("kind", ""), error.get("message", ""), error.get("peer", "?")
    if kind == "PeerUnavailable":
        raise PeerUnavailable(peer, message)
    if kind == "BlobUnavailable":
        raise BlobUnavailable(message)
    if kind == "BlobCorrupt":
        raise BlobCorrupt(message)
    if kind == "TimeoutError":
        raise TimeoutError(message)
    if kind == "PermissionError":
        raise PermissionError(message)
    if kind == "CommClosed":
        raise CommClosed(message)
    if kind == "ValueError":
        raise ValueError(message)
    raise RuntimeError(f"daemon failed the call ({kind}): {message}")


BLOB_TENSOR = "blob"
"""The name of the uint8 tensor a blob crosses shared memory as, between worker and daemon."""


TEST_ONLY_POISON_ENV = "HYPHAE_TEST_ONLY_POISON_EXCHANGES"
"""TEST ONLY. Set to "nan" in a worker's environment and everything it sends by ``exchange`` or
``all_reduce`` (DiLoCo's gathers, DDP's and SPES's rounds, NoLoCo's pairs) is NaN: a real daemon playing the
poisoning member of an attack test (tests/integration/test_poisoned_aggregation.py). Never set it
on a node that trains for real: its peers refuse it and lower its score until they disconnect it."""


def _poisoned(tensors: Mapping[str, torch.Tensor], peer: str, tag: str) -> dict[str, torch.Tensor]:
    log.warning("TEST ONLY (%s=nan): sending NaN to %s for %s", TEST_ONLY_POISON_ENV, peer, tag)
    return {name: torch.full_like(t, float("nan")) for name, t in tensors.items()}


class DaemonComm(Comm):
    """A worker's view of the run, served by its daemon."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer_id: str,
                 on_stop: Callable[[str], None]) -> None:
        self._reader, self._writer = reader, writer
        self._peer_id = peer_id
        self._on_stop = on_stop
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[ipc.Reply]] = {}
        self._pool = SegmentPool(f"hyw{id(self) % 100000}")
        self._attached = Attachments()
        self._closed = False
        self._sent = self._received = 0
        self._reader_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the reply reader (call once, inside the worker's event loop)."""
        self._reader_task = asyncio.get_running_loop().create_task(self._read_loop())

    async def _read_loop(self) -> None:
        try:
            while True:
                message = await ipc.recv(self._reader)
                if isinstance(message, ipc.Reply):
                    fut = self._pending.pop(message.id, None)
                    if fut is not None and not fut.done():
                        fut.set_result(message)
                elif isinstance(message, ipc.Stop):
                    self._on_stop(message.reason)
        except Exception as exc:  # noqa: BLE001 — any socket failure ends the worker's run
            log.warning("lost the daemon: %s", exc)
            self._on_stop("the daemon went away")
        finally:
            self._fail_pending()

    def _fail_pending(self) -> None:
        self._closed = True
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(CommClosed("the daemon connection closed"))
        self._pending.clear()

    async def send_message(self, message: ipc.Message) -> None:
        if not self._closed:
            await ipc.send(self._writer, message)

    async def _call(self, method: str, args: dict[str, Any], tensors: Mapping[str, torch.Tensor] | None = None
                    ) -> tuple[Any, dict[str, torch.Tensor]]:
        if self._closed:
            raise CommClosed("this worker's Comm is closed")
        call_id = next(self._ids)
        shm, refs = "", []
        if tensors:
            shm, refs = pack_torch(tensors, self._pool)
            self._sent += sum(r.nbytes for r in refs)
        fut: asyncio.Future[ipc.Reply] = asyncio.get_running_loop().create_future()
        self._pending[call_id] = fut
        try:
            await ipc.send(self._writer, ipc.Call(id=call_id, method=method, args=args, shm=shm, tensors=refs))
            reply = await fut
        finally:
            self._pending.pop(call_id, None)
            if shm:
                self._pool.release(shm)  # the daemon is done reading once it replied (or gave up)
        if reply.error:
            raise_remote_error(reply.error)
        out: dict[str, torch.Tensor] = {}
        if reply.shm:
            out = unpack_torch(self._attached.get(reply.shm), reply.tensors)
            self._received += sum(r.nbytes for r in reply.tensors)
            await ipc.send(self._writer, ipc.Release(shm=reply.shm))
        return reply.result, out

    # ---- Comm ------------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._peer_id

    async def members(self) -> list[str]:
        result, _ = await self._call("members", {})
        return list(result)

    async def exchange(self, peer: str, tensors: Mapping[str, torch.Tensor], *, tag: str,
                       timeout_s: float) -> dict[str, torch.Tensor]:
        if peer == self._peer_id:
            raise ValueError("cannot exchange with this peer itself")
        if os.environ.get(TEST_ONLY_POISON_ENV) == "nan":
            tensors = _poisoned(tensors, peer, tag)
        _, out = await self._call("exchange", {"peer": peer, "tag": tag, "timeout_s": timeout_s}, tensors)
        return out

    async def all_reduce(self, tensors: Mapping[str, torch.Tensor], *, group: Sequence[str], tag: str,
                         timeout_s: float, op: ReduceOp = "mean") -> AllReduceResult:
        if self._peer_id not in group:
            raise ValueError(f"this peer {self._peer_id} is not in the group {list(group)}")
        if os.environ.get(TEST_ONLY_POISON_ENV) == "nan":
            tensors = _poisoned(tensors, "the group", tag)
        result, out = await self._call(
            "all_reduce", {"group": list(group), "tag": tag, "timeout_s": timeout_s, "op": op}, tensors)
        return AllReduceResult(tensors=out, included=tuple(result["included"]))

    async def publish(self, topic: str, step: int, value: bytes) -> None:
        await self._call("publish", {"topic": topic, "step": step, "value": bytes(value)})

    async def collect(self, topic: str, step: int, *, peers: Sequence[str], timeout_s: float) -> dict[str, bytes]:
        result, _ = await self._call("collect", {"topic": topic, "step": step, "peers": list(peers),
                                                 "timeout_s": timeout_s})
        return {str(k): bytes(v) for k, v in result.items()}

    async def put_blob(self, data: bytes) -> str:
        # The bytes go through shared memory like tensors: a model's weights blob is far larger
        # than an IPC frame may be (ipc.MAX_FRAME_BYTES).
        blob = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
        result, _ = await self._call("put_blob", {}, {BLOB_TENSOR: blob})
        return str(result)

    async def get_blob(self, digest: str, *, timeout_s: float) -> bytes:
        _, out = await self._call("get_blob", {"digest": digest, "timeout_s": timeout_s})
        if BLOB_TENSOR not in out:
            raise CommClosed(f"the daemon's reply to get_blob {digest[:12]} carried no blob")
        return out[BLOB_TENSOR].numpy().tobytes()

    async def state_get(self, key: str) -> Any:
        result, _ = await self._call("state_get", {"key": key})
        return result

    async def state_set(self, key: str, value: Any) -> None:
        check_plain(value)
        await self._call("state_set", {"key": key, "value": value})

    async def state_items(self, prefix: str = "") -> dict[str, Any]:
        result, _ = await self._call("state_items", {"prefix": prefix})
        return dict(result)

    async def refuse(self, peer: str, reason: str) -> None:
        await self._call("refuse", {"peer": peer, "reason": reason[:500]})

    def now(self) -> float:
        """The run's clock: wall-clock seconds, which NTP keeps within milliseconds across
        machines. Algorithms that meet on a shared schedule (A²CiD²'s gossip ticks) need every
        peer to read the same time; a per-machine monotonic clock would never line them up."""
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def traffic(self) -> Traffic:
        return Traffic(self._sent, self._received)

    async def aclose(self) -> None:
        """Stop reading replies and free this side's segments (the socket belongs to the worker)."""
        if self._reader_task is not None:
            self._reader_task.cancel()
        self._fail_pending()
        self._pool.close()
        self._attached.close()
