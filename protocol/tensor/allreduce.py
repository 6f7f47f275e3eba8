"""Fault-tolerant group all-reduce (mean or sum) over the tensor plane.

The ``k`` members (sorted peer ids) cut the flattened inputs into ``k`` chunks; member ``j``
owns chunk ``j``. Each member moves about twice its data: its part of every chunk to that
chunk's owner (reduce-scatter), then every owner's reduced chunk to everyone (all-gather).

Who is included, and what happens to a member that drops (the rule):

1. **Reduce-scatter.** Each owner collects the parts of its chunk; ``H`` = the members whose
   part it holds (itself included). A member that fails (connection lost, or silent until
   half the deadline) is simply missing from ``H``.
2. **Vote.** Every member sends its ``H`` to every other; ``V`` = the members whose vote
   arrived. ``I = V ∩ (∩ H over V)``: included are the members whose part reached *every*
   voting owner. Every element of the result is the reduction over exactly ``I``.
3. **Gather.** Chunks whose owner is not in ``I`` (it died) are *re-run among the survivors*:
   the next member of ``I`` after it (ring order) takes the chunk over, and every member of
   ``I`` sends it its part of that chunk again. Owners send reduced chunks, each labelled with
   ``I``, to all voters; a chunk labelled with another set is not accepted.
4. **Repair.** A missing or mismatched chunk is asked for (over ``I``) from its owner, then from
   any other member: members answer from their finished result, or, as owners, recompute it
   from the parts they kept (finished members keep answering for ``linger_s``). If nobody
   has it and members were found dead, ``I`` drops them and step 3 runs again (a new epoch).

So a member that dies before or during reduce-scatter is excluded and the others finish with
the reduction over the rest; one that dies after voting but before sending its chunk makes the
survivors redo the gather without it. Survivors whose views of the failures differ (a member
dying mid-vote) can end with different ``I`` or a timeout; the result always reports the ``I``
its numbers are the reduction over. A member not in ``I`` (alive, but its part was lost)
still receives the result. Reduction is in float64 in member order, by the chunk's owner
only, so every member gets the same bits.

Deadlines: reduce-scatter ends at 50 % of ``timeout_s``, the vote at 65 %, gather and repair
at 100 %. Waiting on a member stops at once when it is found dead (its libp2p connection and
data connections gone, or a send to it failed), so a crash costs seconds, not the deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..errors import PeerError, ProtocolViolation
from ..wire import expect_map
from ._layout import Layout, flat_tensor, from_f64, to_f64
from ._util import run_all
from .codecs import Codec
from .errors import Refused, RemoteError
from .spec import Tensor, numpy_dtype
from .wire import MAX_TAG_CHARS

if TYPE_CHECKING:
    from .service import Reply, TensorPlane

__all__ = ["AllReduceResult", "AllReduce", "ROUTE"]

log = logging.getLogger(__name__)
T = TypeVar("T")

ROUTE = "/hyphae/tensor/allreduce/query"
RS_SHARE, VOTE_SHARE = 0.5, 0.65
"""Deadlines of reduce-scatter and vote, as shares of the whole timeout."""
QUERY_PAUSE_S = 0.05


@dataclass(frozen=True)
class AllReduceResult:
    """The reduced tensors (same names, dtypes and shapes as the inputs) and who is in them."""

    tensors: list[Tensor]
    included: tuple[str, ...]
    """Members whose inputs every element of ``tensors`` reduces over (sorted)."""
    epochs: int = 1
    """Gather rounds it took (more than 1 after a member died between vote and gather)."""


@dataclass
class _Op:
    """One all-reduce as this member sees it (kept for ``linger_s`` to answer queries)."""

    tag: str
    members: list[str]
    dtype: str
    op: str
    bounds: list[tuple[int, int]]
    parts: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    """chunk -> member index -> that member's part as float64 (kept: owners recompute from it)."""
    final: dict[int, tuple[frozenset[int], np.ndarray]] = field(default_factory=dict)
    """chunk -> (member set, reduced values in the op's dtype)."""

    def reduce(self, chunk: int, members: frozenset[int], *, keep: bool) -> np.ndarray | None:
        """Chunk ``chunk`` reduced over ``members`` from the kept parts (None if some are missing).

        ``keep`` makes it this member's result for the chunk; a query for another set does not.
        """
        done = self.final.get(chunk)
        if done is not None and done[0] == members:
            return done[1]
        have = self.parts.get(chunk, {})
        if not members or not members <= have.keys():
            return None
        acc = np.zeros(self.bounds[chunk][1] - self.bounds[chunk][0], dtype=np.float64)
        for i in sorted(members):
            acc += have[i]
        if self.op == "mean":
            acc /= len(members)
        values = from_f64(acc, self.dtype)
        if keep:
            self.final[chunk] = (members, values)
        return values


class AllReduce:
    """Runs all-reduces for one plane and answers other members' repair queries."""

    def __init__(self, plane: TensorPlane, *, linger_s: float = 30.0) -> None:
        self.plane = plane
        self.linger_s = linger_s
        self._ops: dict[str, _Op] = {}
        plane.serve(ROUTE, self._on_query)

    async def run(self, members: Sequence[str], tag: str, tensors: Sequence[Tensor], *, op: str = "mean",
                  timeout_s: float, codec: str | Codec = "raw") -> AllReduceResult:
        """Reduce ``tensors`` over ``members`` (this node among them); see the module docstring.

        Raises:
            ValueError: bad arguments (op, dtypes, self not a member, tag in use).
            TimeoutError: the deadline passed before every chunk over a common set arrived.
            PeerError: no member's part reached every owner (nothing to reduce over).

        Cancellation stops this member's part; the others treat it as failed.
        """
        me = self.plane.peer_id
        members = sorted(set(members))
        if op not in ("mean", "sum"):
            raise ValueError(f"op must be 'mean' or 'sum', got {op!r}")
        if me not in members:
            raise ValueError(f"this node ({me}) must be one of the members")
        if not 0 < len(tag) <= MAX_TAG_CHARS // 2:
            raise ValueError(f"all-reduce tag must be 1-{MAX_TAG_CHARS // 2} characters, got {len(tag)}")
        if tag in self._ops:
            raise ValueError(f"all-reduce tag {tag!r} is in use; give every round its own tag")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        layout = Layout(tensors)
        k = len(members)
        bounds = [(j * layout.numel // k, (j + 1) * layout.numel // k) for j in range(k)]
        state = _Op(tag, members, layout.dtype, op, bounds)
        self._ops[tag] = state
        try:
            round_ = _Round(self, state, layout, members.index(me), Codec.named(codec), time.monotonic(), timeout_s)
            included, epochs = await round_.run()
        finally:
            self.plane._spawn(f"allreduce-linger {tag[:40]}", self._forget, tag)
        out = np.empty(layout.numel, dtype=numpy_dtype(layout.dtype))
        for j, (lo, hi) in enumerate(bounds):
            out[lo:hi] = state.final[j][1]
        return AllReduceResult(layout.unflatten(out), tuple(members[i] for i in sorted(included)), epochs)

    async def _forget(self, tag: str) -> None:
        await asyncio.sleep(self.linger_s)
        self._ops.pop(tag, None)
        self.plane.drop_unclaimed(_prefix(tag))

    async def _on_query(self, peer_id: str, meta: dict[str, Any], tensors: list[Tensor]) -> Reply:
        from .service import Reply

        m = expect_map(meta, {"tag": str, "chunk": int, "set": list}, what="all-reduce query")
        state = self._ops.get(m["tag"])
        if state is None or not 0 <= m["chunk"] < len(state.members):
            return Reply({"have": False})
        members = frozenset(i for i in m["set"] if isinstance(i, int) and 0 <= i < len(state.members))
        values = state.reduce(m["chunk"], members, keep=False)
        if values is None:
            return Reply({"have": False})
        return Reply({"have": True}, [flat_tensor("r", state.dtype, values)])


class _Round:
    """The steps of one all-reduce on this member (state lives in :class:`_Op`)."""

    def __init__(self, owner: AllReduce, state: _Op, layout: Layout, me: int, codec: Codec, start: float,
                 timeout_s: float) -> None:
        self.plane = owner.plane
        self.state, self.layout, self.me, self.codec = state, layout, me, codec
        self.k = len(state.members)
        self.rs_deadline = start + RS_SHARE * timeout_s
        self.vote_deadline = start + VOTE_SHARE * timeout_s
        self.deadline = start + timeout_s
        self.timeout_s = timeout_s
        self.dead: set[int] = set()
        self._scopes: dict[int, set[asyncio.Timeout]] = {}
        self.prefix = _prefix(state.tag)

    def peer(self, i: int) -> str:
        return self.state.members[i]

    def my_part(self, chunk: int) -> list[Tensor]:
        return self.layout.pieces(*self.state.bounds[chunk])

    def keep_part(self, chunk: int, member: int, tensors: list[Tensor]) -> bool:
        """Keep a member's part of a chunk (as float64); False if it is malformed."""
        lo, hi = self.state.bounds[chunk]
        try:
            self.state.parts.setdefault(chunk, {})[member] = to_f64(tensors, self.state.dtype, hi - lo)
        except ProtocolViolation as exc:
            log.warning("all-reduce %s: part of chunk %d from %s: %s", self.state.tag, chunk, self.peer(member), exc)
            return False
        return True

    async def run(self) -> tuple[frozenset[int], int]:
        if self.k == 1:
            self.keep_part(0, 0, self.my_part(0))
            self.state.reduce(0, frozenset([0]), keep=True)
            return frozenset([0]), 1
        have = await self.reduce_scatter()
        included, voters = await self.vote(have)
        epoch = 0
        while True:
            missing = await self.gather(epoch, included, voters)
            if not missing:
                return included, epoch + 1
            shrunk = included - self.dead
            if shrunk == included or not shrunk or time.monotonic() >= self.deadline:
                raise TimeoutError(f"all-reduce {self.state.tag!r}: chunks {sorted(missing)} never arrived over "
                                   f"{len(included)} members within {self.timeout_s} s")
            log.info("all-reduce %s: redoing the gather without %s", self.state.tag,
                     [self.peer(i) for i in sorted(included - shrunk)])
            included, epoch = shrunk, epoch + 1

    async def _with(self, i: int, deadline: float, call: Callable[[], Awaitable[T]]) -> T | None:
        """One exchange with member ``i``: its result, or None if it fails, times out, or ``i`` is
        found dead meanwhile (by this or another exchange: waiting on a dead member stops at once)."""
        if i in self.dead:
            return None
        try:
            async with asyncio.timeout_at(_loop_time(deadline)) as scope:
                self._scopes.setdefault(i, set()).add(scope)
                try:
                    return await call()
                finally:
                    self._scopes[i].discard(scope)
        except TimeoutError:
            return None
        except (ProtocolViolation, RemoteError, Refused) as exc:  # alive, but this exchange failed
            log.warning("all-reduce %s with %s: %s", self.state.tag, self.peer(i), exc)
            return None
        except PeerError as exc:
            log.debug("all-reduce %s: %s is gone: %s", self.state.tag, self.peer(i), exc)
            self.mark_dead(i)
            return None

    def mark_dead(self, i: int) -> None:
        if i in self.dead:
            return
        self.dead.add(i)
        now = asyncio.get_running_loop().time()
        for scope in list(self._scopes.get(i, ())):
            scope.reschedule(now)

    async def reduce_scatter(self) -> frozenset[int]:
        self.keep_part(self.me, self.me, self.my_part(self.me))
        tag = f"{self.prefix}p"

        async def give(j: int) -> None:
            await self._with(j, self.rs_deadline,
                             lambda: self.plane.send(self.peer(j), tag, self.my_part(j), codec=self.codec))

        async def take(j: int) -> int | None:
            got = await self._with(j, self.rs_deadline, lambda: self.plane.recv(self.peer(j), tag))
            return j if got is not None and self.keep_part(self.me, j, got) else None

        others = [j for j in range(self.k) if j != self.me]
        results = await run_all(*(give(j) for j in others), *(take(j) for j in others))
        return frozenset([self.me, *(j for j in results[len(others):] if j is not None)])

    async def vote(self, have: frozenset[int]) -> tuple[frozenset[int], frozenset[int]]:
        tag = f"{self.prefix}v"
        others = [j for j in range(self.k) if j != self.me]

        async def give(j: int) -> None:
            await self._with(j, self.vote_deadline,
                             lambda: self.plane.send(self.peer(j), tag, (), meta={"have": sorted(have)}))

        async def take(j: int) -> frozenset[int] | None:
            got = await self._with(j, self.vote_deadline, lambda: self.plane.recv_message(self.peer(j), tag))
            seen = got.meta.get("have") if got is not None else None
            if not isinstance(seen, list):
                return None
            return frozenset(i for i in seen if isinstance(i, int) and 0 <= i < self.k)

        votes = await run_all(*(give(j) for j in others), *(take(j) for j in others))
        views = {self.me: have} | {j: v for j, v in zip(others, votes[len(others):]) if v is not None}
        voters = frozenset(views)
        included = voters.intersection(*views.values())
        if not included:
            raise PeerError(f"all-reduce {self.state.tag!r}: no member's part reached every owner")
        return included, voters

    def owner(self, chunk: int, included: frozenset[int]) -> int:
        """The chunk's owner, or the next included member after it (ring order) if it is out."""
        for step in range(self.k):
            i = (chunk + step) % self.k
            if i in included:
                return i
        raise AssertionError("included is never empty")

    async def gather(self, epoch: int, included: frozenset[int], voters: frozenset[int]) -> set[int]:
        """Run one gather epoch; return the chunks still missing at its end."""
        owners = {j: self.owner(j, included) for j in range(self.k)}
        mine = [j for j, o in owners.items() if o == self.me]
        recipients = [i for i in voters - self.dead if i != self.me]
        label = sorted(included)
        orphan_tag, result_tag = f"{self.prefix}{epoch}/o", f"{self.prefix}{epoch}/r"

        async def send_orphan_part(j: int) -> None:  # a dead owner's chunk, re-run by its successor
            await self._with(owners[j], self.deadline, lambda: self.plane.send(
                self.peer(owners[j]), f"{orphan_tag}{j}", self.my_part(j), codec=self.codec))

        async def take_orphan_part(j: int, i: int) -> None:
            got = await self._with(i, self.deadline, lambda: self.plane.recv(self.peer(i), f"{orphan_tag}{j}"))
            if got is not None:
                self.keep_part(j, i, got)

        async def give_result(j: int, i: int, values: np.ndarray) -> None:
            await self._with(i, self.deadline, lambda: self.plane.send(
                self.peer(i), f"{result_tag}{j}", [flat_tensor("r", self.state.dtype, values)], meta={"set": label}))

        async def own(j: int) -> None:
            if j != self.me:
                if self.me in included:
                    self.keep_part(j, self.me, self.my_part(j))
                await run_all(*(take_orphan_part(j, i) for i in included if i != self.me))
            values = self.state.reduce(j, included, keep=True)
            if values is not None:
                await run_all(*(give_result(j, i, values) for i in recipients))

        async def fetch(j: int) -> bool:
            got = await self._with(owners[j], self.deadline,
                                   lambda: self.plane.recv_message(self.peer(owners[j]), f"{result_tag}{j}"))
            if got is not None and got.meta.get("set") == label and self._accept(j, included, got.tensors):
                return True
            return await self.repair(j, included, owners[j])

        orphans_elsewhere = [j for j, o in owners.items() if o != j and o != self.me and self.me in included]
        theirs = [j for j in range(self.k) if owners[j] != self.me]
        results = await run_all(*(send_orphan_part(j) for j in orphans_elsewhere), *(own(j) for j in mine),
                                *(fetch(j) for j in theirs))
        got = results[len(orphans_elsewhere) + len(mine):]
        missing = {j for j, ok in zip(theirs, got) if not ok}
        missing |= {j for j in mine if self.state.final.get(j, (None,))[0] != included}
        return missing

    def _accept(self, chunk: int, included: frozenset[int], tensors: list[Tensor]) -> bool:
        lo, hi = self.state.bounds[chunk]
        t = tensors[0] if len(tensors) == 1 else None
        if t is None or t.spec.dtype != self.state.dtype or t.spec.numel != hi - lo:
            log.warning("all-reduce %s: chunk %d has the wrong size or dtype; ignoring it", self.state.tag, chunk)
            return False
        self.state.final[chunk] = (included, np.frombuffer(t.data, dtype=numpy_dtype(self.state.dtype)))
        return True

    async def repair(self, chunk: int, included: frozenset[int], owner: int) -> bool:
        """Ask the owner, then everyone else, for ``chunk`` over ``included``, until the deadline.

        False at once when the owner is dead (the caller then redoes the gather without it).
        """
        meta = {"tag": self.state.tag, "chunk": chunk, "set": sorted(included)}
        while time.monotonic() < self.deadline and owner not in self.dead:
            for i in [owner] + [i for i in sorted(included) if i not in (owner, self.me)]:
                reply = await self._with(i, self.deadline, lambda i=i: self.plane.request(self.peer(i), ROUTE, meta))
                if reply is not None and reply.meta.get("have") and self._accept(chunk, included, list(reply.tensors)):
                    return True
            await asyncio.sleep(QUERY_PAUSE_S)
        return False

def _prefix(tag: str) -> str:
    return f"/hyphae/ar/{tag}/"


def _loop_time(deadline: float) -> float:
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())
