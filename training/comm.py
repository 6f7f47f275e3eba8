"""`Comm`: the one interface training algorithms use to talk to other peers.

`hyphae.training` owns this interface (STYLE.md §2); it has two implementations:
- `hyphae.training.sim.SimComm`: N peers in one process and one event loop, in memory, with
  injectable latency, bandwidth and failures, on a virtual clock (tests, 1000-peer simulations);
- the daemon's (built in `hyphae.node`): forwards each call over local IPC to the node, which
  moves tensors over the tensor plane and small values over libp2p.

Everything that can wait on the network is a coroutine. Deadlines are either a `timeout_s`
argument (where a partial result is still useful: all-reduce, collect) or the caller's own
`asyncio.timeout()` / the `timeout_s` of `exchange`, which raise `TimeoutError`.

Expected network outcomes are the exceptions below (plus `TimeoutError`), so an algorithm can
catch them and fall back (e.g. NoLoCo takes a local-only outer step):

    CommError
    ├── PeerUnavailable      the other side is gone, unknown or left mid-operation
    │   └── BlobUnavailable  no live peer holds the requested blob
    ├── BlobCorrupt          a blob's bytes do not match its hash
    └── CommClosed           this peer's own Comm is closed (it left or was killed)

Programming errors (bad arguments, mismatched tensor shapes) raise ValueError.

Tensors handed to a Comm are never kept by reference after the call returns, and tensors it
returns are fresh copies owned by the caller: peers never share memory.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from hyphae.training._tensor_codec import decode_tensors, encode_tensors

ReduceOp = Literal["mean", "sum"]
"""How `all_reduce` combines contributions."""

MAX_SCALAR_BYTES = 1024
"""Largest value `publish` accepts: it is for per-step scalars, not tensors."""


class CommError(Exception):
    """Base of the expected communication failures."""


class PeerUnavailable(CommError):
    """The other peer is not a live member, or left/was lost before the operation finished."""

    def __init__(self, peer: str, reason: str) -> None:
        super().__init__(f"peer {peer} unavailable: {reason}")
        self.peer = peer


class BlobUnavailable(PeerUnavailable):
    """No live peer can serve the blob with this hash."""

    def __init__(self, digest: str) -> None:
        super().__init__("*", f"no live peer holds blob {digest}")
        self.digest = digest


class BlobCorrupt(CommError):
    """A fetched blob's sha256 differs from the hash it was requested by."""


class CommClosed(CommError):
    """This peer's Comm is closed (it left the run or was killed); make no further calls."""


@dataclass(frozen=True, slots=True)
class AllReduceResult:
    """Outcome of `Comm.all_reduce`.

    Attributes:
        tensors: the reduced tensors, fresh copies owned by the caller, same names/dtypes.
        included: peer ids whose contributions are in the result, sorted. A member that
            dropped or came too late is absent; the caller itself is absent if its own
            contribution missed the round (it still receives the group's result).
    """

    tensors: dict[str, torch.Tensor]
    included: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Traffic:
    """Bytes this peer moved since its Comm opened (payload bytes, framing not counted)."""

    sent_bytes: int = 0
    received_bytes: int = 0

    def __add__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent_bytes + other.sent_bytes, self.received_bytes + other.received_bytes)

    def __sub__(self, other: Traffic) -> Traffic:
        return Traffic(self.sent_bytes - other.sent_bytes, self.received_bytes - other.received_bytes)


class Comm(ABC):
    """A peer's handle on the run: membership, tensor exchange, small values, blobs, state, time.

    One Comm belongs to one peer and is used from one event loop. Calls may run concurrently
    (e.g. a gossip task beside the training loop) unless a method says otherwise.
    Cancelling a call never leaves a half-applied effect on this peer; what the other peers
    see is stated per method.
    """

    @property
    @abstractmethod
    def peer_id(self) -> str:
        """This peer's id (stable for the run; in the daemon, the libp2p peer id)."""

    @abstractmethod
    async def members(self) -> list[str]:
        """Live members of the run, sorted by peer id, this peer included.

        Raises:
            CommClosed: this Comm is closed.
        """

    @abstractmethod
    async def exchange(
        self, peer: str, tensors: Mapping[str, torch.Tensor], *, tag: str, timeout_s: float
    ) -> dict[str, torch.Tensor]:
        """Swap tensors with one peer: both send, both receive (NoLoCo's and gossip's primitive).

        Both sides must call with each other's id and the same `tag` (e.g. "noloco/17").

        Args:
            peer: the other peer's id (not this peer's).
            tensors: what to send; read during the call only.
            tag: names this exchange; unique per pair and round.
            timeout_s: how long to wait for the partner, transfer included.

        Returns:
            The partner's tensors (fresh copies).

        Raises:
            PeerUnavailable: `peer` is not a live member or was lost during the exchange.
            TimeoutError: the partner did not arrive (or the transfer did not end) in time.
            CommClosed: this Comm is closed.
            ValueError: `peer` is this peer.

        Cancellation (or timeout) withdraws this side's offer; a partner that already
        received it keeps it, so the two sides may disagree on whether it happened.
        """

    @abstractmethod
    async def all_reduce(
        self,
        tensors: Mapping[str, torch.Tensor],
        *,
        group: Sequence[str],
        tag: str,
        timeout_s: float,
        op: ReduceOp = "mean",
    ) -> AllReduceResult:
        """Reduce tensors over a group of members, tolerating members that drop out.

        Every member of `group` calls with the same `tag` and tensors of the same names,
        shapes and dtypes. The round ends when every live member of `group` contributed, or
        `timeout_s` after the first contribution; members lost before the end and
        stragglers are excluded and the result is the mean (or sum) over `included`.
        Floating tensors are reduced in float64 and cast back; every included member gets
        the bit-identical result.

        Args:
            tensors: this peer's contribution; read during the call only.
            group: the members expected (usually `await members()`); must contain this peer.
            tag: names the round (e.g. "diloco/12"); unique per round.
            timeout_s: how long the round waits for stragglers after its first contribution.
            op: "mean" or "sum".

        Returns:
            The reduced tensors and who was included. A contribution arriving after the
            round closed gets that round's result without being in `included`.

        Raises:
            CommClosed: this Comm is closed.
            ValueError: this peer not in `group`, or tensors that do not match the round's.

        Cancellation withdraws this peer's contribution if the round has not closed yet (the
        others finish without it); after the round closed it changes nothing for others.
        """

    @abstractmethod
    async def publish(self, topic: str, step: int, value: bytes) -> None:
        """Announce a small value for (topic, step) to every member (e.g. a 1-byte ZO scalar).

        Publishing twice for the same (topic, step) replaces the earlier value.

        Raises:
            ValueError: `value` longer than `MAX_SCALAR_BYTES`.
            CommClosed: this Comm is closed.

        Cancellation: the value may or may not have gone out; publishing again is harmless.
        """

    @abstractmethod
    async def collect(
        self, topic: str, step: int, *, peers: Sequence[str], timeout_s: float
    ) -> dict[str, bytes]:
        """Gather the values `peers` published for (topic, step).

        Waits until every peer of `peers` has published (or is gone), at most `timeout_s`;
        a partial answer is a normal outcome, not an error.

        Returns:
            peer id -> value for those that arrived in time (this peer's own included if it
            published and is listed).

        Raises:
            CommClosed: this Comm is closed.

        Cancellation leaves nothing behind; values keep arriving for a later `collect`.
        """

    @abstractmethod
    async def put_blob(self, data: bytes) -> str:
        """Store `data` content-addressed and offer it to the run.

        Returns:
            Its sha256 hex digest, by which any peer can `get_blob` it.

        Raises:
            CommClosed: this Comm is closed.

        Cancellation: the blob may or may not be stored; putting it again is harmless.
        """

    @abstractmethod
    async def get_blob(self, digest: str, *, timeout_s: float) -> bytes:
        """Fetch the blob named `digest` from any peer that holds it, verified.

        Raises:
            BlobUnavailable: no live peer holds it.
            BlobCorrupt: the bytes received do not hash to `digest`.
            TimeoutError: not received within `timeout_s`.
            CommClosed: this Comm is closed.

        Cancellation leaves nothing behind (a partial download is discarded).
        """

    @abstractmethod
    async def state_get(self, key: str) -> Any:
        """This peer's view of `key` in the replicated run state (None if unset).

        Values are plain data: None, bool, int, float, str, bytes, lists and str-keyed dicts.
        The view is eventually consistent: another peer's write shows up after some delay.

        Raises:
            CommClosed: this Comm is closed.
        """

    @abstractmethod
    async def state_set(self, key: str, value: Any) -> None:
        """Write `key` in the replicated run state (None deletes it); last writer wins.

        Raises:
            ValueError: `value` is not plain data (see `state_get`).
            PermissionError: this peer may not write `key` (the daemon checks authorship).
            CommClosed: this Comm is closed.

        Cancellation: the write may or may not have been applied; read it back to know.
        """

    @abstractmethod
    async def state_items(self, prefix: str = "") -> dict[str, Any]:
        """Every key of this peer's state view that starts with `prefix`, with its value."""

    @abstractmethod
    def now(self) -> float:
        """Seconds on the run's clock (monotonic; virtual in simulations). Use differences."""

    @abstractmethod
    async def sleep(self, seconds: float) -> None:
        """Sleep on the run's clock (instant in wall time under a virtual clock)."""

    @abstractmethod
    def traffic(self) -> Traffic:
        """Payload bytes this peer sent and received so far."""

    @abstractmethod
    async def aclose(self) -> None:
        """Leave the run: others see this peer gone. Idempotent."""

    async def refuse(self, peer: str, reason: str) -> None:
        """Tell this peer's node that `peer` sent a contribution the algorithm refused (NaN/Inf,
        wrong tensors): the daemon lowers that peer's score, so a member that keeps sending
        garbage is disconnected. Not abstract: a Comm with no node behind it (the simulator)
        has nobody to tell, and the algorithm keeps its own count either way."""

    async def put_tensors(self, tensors: Mapping[str, torch.Tensor]) -> str:
        """`put_blob` of named tensors in the deterministic HYT1 format; returns the hash."""
        return await self.put_blob(encode_tensors(dict(tensors)))

    async def get_tensors(self, digest: str, *, timeout_s: float) -> dict[str, torch.Tensor]:
        """`get_blob` + decode: fresh CPU tensors, hash verified.

        Raises:
            Everything `get_blob` raises; BlobCorrupt if the verified bytes do not decode.
        """
        data = await self.get_blob(digest, timeout_s=timeout_s)
        try:
            return decode_tensors(data)
        except ValueError as exc:
            raise BlobCorrupt(f"blob {digest} is not a tensor blob: {exc}") from exc


def blob_digest(data: bytes) -> str:
    """The content address of `data` (sha256, hex)."""
    return hashlib.sha256(data).hexdigest()


def check_plain(value: Any, *, path: str = "value", depth: int = 0) -> None:
    """Raise ValueError unless `value` is plain msgpack-able data (see `Comm.state_get`)."""
    if depth > 32:
        raise ValueError(f"{path} nests deeper than 32 levels; flatten it")
    if value is None or isinstance(value, bool | int | float | str | bytes):
        return
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_plain(item, path=f"{path}[{i}]", depth=depth + 1)
        return
    if isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{path} has a non-string key {k!r}; run-state dict keys must be str")
            check_plain(item, path=f"{path}[{k!r}]", depth=depth + 1)
        return
    raise ValueError(
        f"{path} is a {type(value).__name__}; run-state values must be None, bool, int, float, "
        "str, bytes, lists or str-keyed dicts"
    )
