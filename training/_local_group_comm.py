"""`LocalGroupComm`: one Comm for a node's local group, spoken by rank 0 and mirrored to the rest.

Rank 0 makes each call on the real Comm and broadcasts its outcome; the other ranks make the
same calls (they run the same code) and wait for that outcome instead of going to the network.
Calls are numbered in the order the strategy makes them, which is the same on every rank, and
outcomes are broadcast in that order even when calls run concurrently (NoLoCo's and robust
DiLoCo's exchanges, SPES's fetches), so each rank matches each outcome to its own call.

An outcome is a msgpack header (plain value, error kind and message, tensor layout, rank 0's
clock) and the tensors' raw bytes, in one uint8 buffer: no pickle. Rank 0 returns the decoded
header too, so both sides see the same types (msgpack turns tuples into lists).

`now()` is rank 0's clock as of this task's last call (a context variable, so concurrent
tasks each see their own), so deadline loops (SPES waits for a blob until a deadline) take the
same number of turns on every rank. Time that passes without a call does not show in `now()`.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgpack
import torch

from hyphae.training._tensor_codec import _DTYPES, _NAMES
from hyphae.training.comm import (
    AllReduceResult,
    BlobCorrupt,
    BlobUnavailable,
    Comm,
    CommClosed,
    PeerUnavailable,
    ReduceOp,
    Traffic,
)

if TYPE_CHECKING:
    from hyphae.training.local_group import LocalGroup

__all__ = ["LocalGroupComm"]

_ERRORS: dict[str, type[Exception]] = {
    "BlobUnavailable": BlobUnavailable, "PeerUnavailable": PeerUnavailable, "BlobCorrupt": BlobCorrupt,
    "CommClosed": CommClosed, "TimeoutError": TimeoutError, "PermissionError": PermissionError,
    "ValueError": ValueError,
}
"""Errors a strategy may catch, mirrored by type (the most specific first); others end the run."""


class LocalGroupComm(Comm):
    """The Comm every rank of a local group hands its strategy.

    Args:
        inner: this rank's own Comm (only rank 0's is called; the others give the peer id).
        group: the node's group.

    Creating it is a collective (the ranks agree on rank 0's clock).
    """

    def __init__(self, inner: Comm, group: LocalGroup) -> None:
        self._inner, self._group = inner, group
        self._tail: asyncio.Future[None] | None = None
        self._clock: contextvars.ContextVar[float | None] = contextvars.ContextVar(f"local_group_now_{id(self)}",
                                                                                   default=None)
        self._start = group.share_float(inner.now() if group.is_leader else 0.0)
        self._closed = False

    # ---- the mirror ------------------------------------------------------------------------

    async def _mirror(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """Rank 0: run `call` and broadcast its outcome; others: receive it. In call order."""
        prev, done = self._tail, asyncio.get_running_loop().create_future()
        self._tail = done
        if self._group.is_leader:
            value, error, stamp = await self._lead(call, prev, done)
        else:
            # Shielded: a cancelled caller still takes its outcome off the wire, or every later
            # outcome would land on the wrong call.
            value, error, stamp = await asyncio.shield(self._receive(prev, done))
        self._clock.set(stamp)
        if error is not None:
            raise error
        return value

    async def _lead(self, call: Callable[[], Awaitable[Any]], prev: asyncio.Future[None] | None,
                    done: asyncio.Future[None]) -> tuple[Any, BaseException | None, float]:
        try:
            value, error = await call(), None
        except asyncio.CancelledError:
            # Tell the others this call ended without an outcome, then go on being cancelled.
            await asyncio.shield(self._publish(prev, done, {"k": "cancelled"}, {}))
            raise
        except Exception as exc:  # noqa: BLE001 - mirrored to the other ranks, then re-raised here
            value, error = None, exc
        header, tensors = _encode(value, error)
        stamp = await asyncio.shield(self._publish(prev, done, header, tensors))
        if error is None and header["k"] == "plain":
            value = _plain(header["v"])  # the others see the msgpack round trip: so do we
        return value, error, stamp

    async def _publish(self, prev: asyncio.Future[None] | None, done: asyncio.Future[None],
                       header: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> float:
        try:
            if prev is not None:
                await prev
            header["now"] = stamp = self._inner.now()
            await self._group.run(self._group.broadcast_bytes, _pack(header, tensors))
            return stamp
        finally:
            if not done.done():
                done.set_result(None)

    async def _receive(self, prev: asyncio.Future[None] | None, done: asyncio.Future[None]
                       ) -> tuple[Any, BaseException | None, float]:
        try:
            if prev is not None:
                await prev
            buf = await self._group.run(self._group.broadcast_bytes, None)
        finally:
            if not done.done():
                done.set_result(None)
        header, tensors = _unpack(buf)
        kind = header["k"]
        if kind == "cancelled":
            error: BaseException | None = RuntimeError(
                "rank 0 cancelled a Comm call this rank did not: the ranks diverged; restart the group")
            return None, error, float(header["now"])
        if kind == "error":
            return None, _error(header["e"]), float(header["now"])
        if kind == "reduce":
            return AllReduceResult(tensors=tensors, included=tuple(header["inc"])), None, float(header["now"])
        if kind == "tensors":
            return tensors, None, float(header["now"])
        return _plain(header["v"]), None, float(header["now"])

    # ---- Comm ------------------------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._inner.peer_id

    async def members(self) -> list[str]:
        return await self._mirror(lambda: self._inner.members())

    async def exchange(self, peer: str, tensors: Mapping[str, torch.Tensor], *, tag: str,
                       timeout_s: float) -> dict[str, torch.Tensor]:
        return await self._mirror(lambda: self._inner.exchange(peer, tensors, tag=tag, timeout_s=timeout_s))

    async def all_reduce(self, tensors: Mapping[str, torch.Tensor], *, group: Sequence[str], tag: str,
                         timeout_s: float, op: ReduceOp = "mean") -> AllReduceResult:
        return await self._mirror(lambda: self._inner.all_reduce(tensors, group=group, tag=tag,
                                                                 timeout_s=timeout_s, op=op))

    async def publish(self, topic: str, step: int, value: bytes) -> None:
        await self._mirror(lambda: self._inner.publish(topic, step, value))

    async def collect(self, topic: str, step: int, *, peers: Sequence[str], timeout_s: float) -> dict[str, bytes]:
        return await self._mirror(lambda: self._inner.collect(topic, step, peers=peers, timeout_s=timeout_s))

    async def put_blob(self, data: bytes) -> str:
        return await self._mirror(lambda: self._inner.put_blob(data))

    async def get_blob(self, digest: str, *, timeout_s: float) -> bytes:
        return await self._mirror(lambda: self._inner.get_blob(digest, timeout_s=timeout_s))

    async def put_tensors(self, tensors: Mapping[str, torch.Tensor]) -> str:
        # Rank 0 encodes; the others need only the digest.
        return await self._mirror(lambda: self._inner.put_tensors(tensors))

    async def get_tensors(self, digest: str, *, timeout_s: float) -> dict[str, torch.Tensor]:
        return await self._mirror(lambda: self._inner.get_tensors(digest, timeout_s=timeout_s))

    async def state_get(self, key: str) -> Any:
        return await self._mirror(lambda: self._inner.state_get(key))

    async def state_set(self, key: str, value: Any) -> None:
        await self._mirror(lambda: self._inner.state_set(key, value))

    async def state_items(self, prefix: str = "") -> dict[str, Any]:
        return await self._mirror(lambda: self._inner.state_items(prefix))

    def now(self) -> float:
        stamp = self._clock.get()
        return self._start if stamp is None else stamp

    async def sleep(self, seconds: float) -> None:
        await self._mirror(lambda: self._inner.sleep(seconds))

    async def refuse(self, peer: str, reason: str) -> None:
        """Rank 0 reports the refused peer to its node; the others' reports would be duplicates."""
        if self._group.is_leader:
            await self._inner.refuse(peer, reason)

    def traffic(self) -> Traffic:
        return self._inner.traffic() if self._group.is_leader else Traffic()

    async def aclose(self) -> None:
        """Close rank 0's Comm (the others never used theirs); idempotent."""
        if not self._closed:
            self._closed = True
            if self._group.is_leader:
                await self._inner.aclose()


# ---- outcomes on the wire ------------------------------------------------------------------


def _encode(value: Any, error: BaseException | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if error is not None:
        kind = next((k for k, cls in _ERRORS.items() if isinstance(error, cls)), "RuntimeError")
        peer = getattr(error, "digest", None) if kind == "BlobUnavailable" else getattr(error, "peer", "")
        return {"k": "error", "e": [kind, str(error), peer or ""]}, {}
    if isinstance(value, AllReduceResult):
        return {"k": "reduce", "inc": list(value.included)}, value.tensors
    if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
        return {"k": "tensors"}, value
    return {"k": "plain", "v": value}, {}


def _pack(header: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[header length: 8 bytes][msgpack header][tensor bytes], as one uint8 tensor."""
    flat = [t.detach().contiguous().reshape(-1) for t in tensors.values()]
    header["t"] = [[n, _NAMES[t.dtype], list(t.shape), t.device.type] for n, t in tensors.items()]
    head = msgpack.packb(header, use_bin_type=True)
    parts = [torch.frombuffer(bytearray(len(head).to_bytes(8, "little") + head), dtype=torch.uint8)]
    parts += [f.cpu().view(torch.uint8) if f.numel() else torch.empty(0, dtype=torch.uint8) for f in flat]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _unpack(buf: torch.Tensor) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    raw = buf.cpu()
    size = int.from_bytes(bytes(raw[:8].tolist()), "little")
    header = msgpack.unpackb(raw[8 : 8 + size].numpy().tobytes(), raw=False)
    offset, out = 8 + size, {}
    for name, dtype_name, shape, where in header.pop("t"):
        dtype = _DTYPES[dtype_name]
        nbytes = math.prod(shape) * dtype.itemsize
        # Rank 0 gets its tensors on their device; so does this rank (the group's own if a GPU).
        chunk = (buf if where != "cpu" else raw)[offset : offset + nbytes].clone()
        out[name] = chunk.view(dtype).reshape(shape)
        offset += nbytes
    return header, out


def _plain(value: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False)


def _error(fields: list[str]) -> BaseException:
    kind, message, peer = fields
    if kind == "BlobUnavailable":
        return BlobUnavailable(peer)
    if kind == "PeerUnavailable":
        prefix = f"peer {peer} unavailable: "
        return PeerUnavailable(peer, message[len(prefix):] if message.startswith(prefix) else message)
    cls = _ERRORS.get(kind, RuntimeError)
    return cls(message if kind in _ERRORS else f"rank 0's Comm call failed ({message})")
