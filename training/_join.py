"""Joining a run in progress: at an outer-step boundary the members hand a joiner their outer state.

A peer that joins a DiLoCo-family run must start where the members are — the φ of their latest
outer step, the outer optimizer's momentum and the loop step that boundary stands for — not from
one member's in-progress inner weights. Then its first outer step applies the same combined Δ to
the same φ with the same momentum as every member, and it comes out holding their φ bit for bit.

Run-state records (each key ends in its writer's peer id, so only that peer may write it):

- ``join/outer/<member>`` = {"algorithm", "layout", "step", "state"?, "state_step"?}: a member's
  latest boundary and, while someone is joining, the digest of a tensor blob of its outer state
  (`Joinable.outer_state`) at boundary ``state_step``;
- ``join/want/<joiner>`` = {"algorithm", "layout", "after"}: a joiner asking for the outer state
  of a boundary later than ``after`` (the median step of the members' records when it asked).

Cost: an outer state is one or two model-sized fp32 copies (a 1B model: 8 GB), so it is put only
when someone asks: the first `SOURCES` live members (sorted peer ids, requesters left out) put it
at the first boundary after a request and name it while a request is pending, after which the
blob store may trim it. DiLoCo's φ and momentum are the same bits on every member, so its sources
put one content address. Without a request a member only writes its step record (a few bytes,
every ``record_every`` boundaries), which tells joiners a run is in progress and how far it is.

Joiner (`JoinDesk.join`): no live member's record for this algorithm and model layout means a
fresh run (None: start from the seeded init, as the members did). Otherwise it asks, waits for
a state newer than what it saw, and believes one only if its step is not above the median (low)
of the live members' record steps (a member claiming step 10^9 is not taken); among those it
takes the newest step, then the digest most members named. The fetched tensors must be finite
and have this model's names and shapes (`load_outer_state` raises ValueError otherwise, before
it changes anything); a state that fails is refused, its publishers reported (`Comm.refuse`),
and it asks again. It gives up (None) when the members passed two boundaries since it asked
without publishing (members that do not serve joiners), or after ``wait_s``.
"""

from __future__ import annotations

import hashlib
import logging
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from hyphae.training.comm import Comm, CommClosed, CommError
from hyphae.training.robust import is_finite

__all__ = ["JoinDesk", "Joinable", "OUTER_PREFIX", "SOURCES", "WANT_PREFIX", "check_outer_state", "layout_of"]

logger = logging.getLogger(__name__)

OUTER_PREFIX = "join/outer/"
WANT_PREFIX = "join/want/"
SOURCES = 3
"""Members that put the outer state for a joiner (more only cost encodes; fewer, redundancy)."""
POLL_S = 0.25
"""How often a joiner re-reads the run state while it waits for a boundary."""
GIVE_UP_BOUNDARIES = 2


class Joinable(Protocol):
    """What a strategy offers `JoinDesk`: its outer state, and how to start from one."""

    algorithm: str

    def outer_state(self) -> dict[str, torch.Tensor]:
        """The tensors a joiner needs at this boundary (read during `put_tensors` only)."""
        ...

    def load_outer_state(self, tensors: Mapping[str, torch.Tensor], step: int) -> int:
        """Start from a member's outer state of boundary `step`; returns the loop step to start at.

        Raises:
            ValueError: names or shapes that are not this model's (nothing was changed).
        """
        ...


def layout_of(params: Iterable[tuple[str, torch.Tensor]]) -> str:
    """A short fingerprint of parameter names and shapes: peers with equal ones train one model."""
    h = hashlib.sha256()
    for name, p in params:
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


def check_outer_state(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                      required: Sequence[str], optional: Sequence[str] = ()) -> None:
    """Raise ValueError unless `tensors` holds ``<kind>/<name>`` shaped like ``reference[name]``
    for every required kind and name, and nothing else but optional kinds of the same names."""
    for kind in required:
        missing = [n for n in reference if f"{kind}/{n}" not in tensors]
        if missing:
            raise ValueError(f"outer state lacks {kind}/{missing[0]} (and {len(missing) - 1} more); another model?")
    for key, t in tensors.items():
        kind, _, name = key.partition("/")
        if kind not in (*required, *optional) or name not in reference:
            raise ValueError(f"outer state holds {key[:80]!r}, which this model has not")
        if tuple(t.shape) != tuple(reference[name].shape) or not t.is_floating_point():
            raise ValueError(f"outer state {key[:80]!r} is {t.dtype} {tuple(t.shape)}, expected "
                             f"{tuple(reference[name].shape)}")


def _valid_record(value: Any) -> bool:
    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(value, dict) or not count(value.get("step")):
        return False
    if "state" not in value:
        return True
    digest = value.get("state")
    return (isinstance(digest, str) and len(digest) == 64 and count(value.get("state_step"))
            and value["state_step"] <= value["step"])


class JoinDesk:
    """One peer's side of joining: serving joiners at boundaries, and joining itself.

    Args:
        comm: this peer's Comm.
        strategy: the algorithm whose outer state moves.
        layout: `layout_of` the strategy's parameters.
        record_every: write the step record every this many boundaries when nobody asks (and
            at the first); every boundary while someone does.
        wait_s: longest a joiner waits for a state.
        fetch_timeout_s: deadline of one state download.
    """

    def __init__(self, comm: Comm, strategy: Joinable, *, layout: str, record_every: int = 1,
                 wait_s: float = 7200.0, fetch_timeout_s: float = 600.0) -> None:
        self.comm, self.strategy, self.layout = comm, strategy, layout
        self.record_every, self.wait_s, self.fetch_timeout_s = record_every, wait_s, fetch_timeout_s
        self.published: tuple[int, str] | None = None
        """(boundary, digest) of the outer state this peer names for joiners, if any."""
        self.served = 0
        """Outer states this peer put for joiners."""
        self._boundaries = 0

    def _matches(self, value: Any) -> bool:
        return (isinstance(value, dict) and value.get("algorithm") == self.strategy.algorithm
                and value.get("layout") == self.layout)

    # --- members ------------------------------------------------------------------------------

    async def boundary(self, step: int) -> None:
        """At boundary `step` (e.g. outer steps done): record it, and serve any joiner waiting.

        Never raises a network failure (a joiner then waits for the next boundary); CommClosed
        propagates.
        """
        try:
            await self._boundary(step)
        except CommClosed:
            raise
        except CommError as exc:
            logger.warning("%s boundary %d: could not serve joiners (%s)", self.strategy.algorithm, step, exc)

    async def _boundary(self, step: int) -> None:
        self._boundaries += 1
        wants = await self._wants(step)
        due = self._boundaries == 1 or self._boundaries % self.record_every == 0
        if not wants and self.published is None and not due:
            return
        record: dict[str, Any] = {"algorithm": self.strategy.algorithm, "layout": self.layout, "step": step}
        if wants:
            members = await self.comm.members()
            sources = [p for p in members if p not in wants][:SOURCES]
            newest_ask = max(w["after"] for w in wants.values())
            if self.comm.peer_id in sources and (self.published is None or self.published[0] <= newest_ask):
                digest = await self.comm.put_tensors(self.strategy.outer_state())
                self.published, self.served = (step, digest), self.served + 1
                logger.info("%s boundary %d: outer state %s put for %s", self.strategy.algorithm, step,
                            digest[:12], ", ".join(sorted(wants)))
            if self.published is not None:
                record["state"], record["state_step"] = self.published[1], self.published[0]
        else:
            self.published = None  # nobody waits: the blob may be trimmed
        await self.comm.state_set(f"{OUTER_PREFIX}{self.comm.peer_id}", record)

    async def _wants(self, step: int) -> dict[str, dict[str, Any]]:
        """Live peers (not this one) asking for a boundary before `step` of this algorithm and model."""
        items = await self.comm.state_items(WANT_PREFIX)
        if not items:
            return {}
        members, me = set(await self.comm.members()), self.comm.peer_id
        out = {}
        for key, value in items.items():
            peer = key[len(WANT_PREFIX):]
            after = value.get("after") if isinstance(value, dict) else None
            if (peer != me and peer in members and self._matches(value) and isinstance(after, int)
                    and not isinstance(after, bool) and after < step):
                out[peer] = value
        return out

    # --- the joiner ---------------------------------------------------------------------------

    async def join(self) -> int | None:
        """Take the run's outer state at its next boundary; returns the loop step to start at.

        Returns None for a fresh run (no live member recorded a boundary of this algorithm and
        model) and when no member served a state in time (see the module docstring).

        Raises:
            CommClosed: this peer left.
        """
        records = await self._records()
        if not records:
            return None
        after = statistics.median_low(r["step"] for r in records.values())
        logger.info("%s: joining a run at boundary %d (%d members); asking for their outer state",
                    self.strategy.algorithm, after, len(records))
        await self._ask(after)
        try:
            return await self._wait(after)
        finally:
            await self._withdraw()

    async def _wait(self, after: int) -> int | None:
        deadline = self.comm.now() + self.wait_s
        refused: set[str] = set()
        while self.comm.now() < deadline:
            records = await self._records()
            candidates = _candidates(records, after, refused)
            for (step, digest), authors in candidates:
                start = await self._take(step, digest, authors)
                if start is not None:
                    return start
                refused.add(digest)
            steps = [r["step"] for r in records.values()]
            if candidates:  # all refused: ask for a newer one
                after = statistics.median_low(steps)
                await self._ask(after)
            elif steps and statistics.median_low(steps) >= after + GIVE_UP_BOUNDARIES:
                logger.warning("%s: the members passed %d boundaries without putting their outer state; "
                               "not joining through it", self.strategy.algorithm, GIVE_UP_BOUNDARIES)
                return None
            await self.comm.sleep(POLL_S)
        logger.warning("%s: no outer state within %.0f s; not joining through it", self.strategy.algorithm, self.wait_s)
        return None

    async def _take(self, step: int, digest: str, authors: list[str]) -> int | None:
        """Fetch, check and load one outer state; the loop step to start at, or None if refused."""
        try:
            tensors = await self.comm.get_tensors(digest, timeout_s=self.fetch_timeout_s)
        except CommClosed:
            raise
        except (CommError, TimeoutError) as exc:
            logger.warning("outer state %s of boundary %d unavailable (%s)", digest[:12], step, exc)
            return None
        why = "" if is_finite(tensors) else "NaN/Inf values"
        if not why:
            try:
                start = self.strategy.load_outer_state(tensors, step)
            except ValueError as exc:
                why = str(exc)
            else:
                logger.info("%s: took outer state %s of boundary %d (from %s); starting at step %d",
                            self.strategy.algorithm, digest[:12], step, ", ".join(authors), start)
                return start
        logger.warning("refusing outer state %s of boundary %d from %s: %s", digest[:12], step, ", ".join(authors), why)
        for author in authors:
            await self.comm.refuse(author, f"outer state {digest[:12]}: {why}")
        return None

    async def _records(self) -> dict[str, dict[str, Any]]:
        """Live members' (not this peer's) well-formed records of this algorithm and model."""
        items = await self.comm.state_items(OUTER_PREFIX)
        if not items:
            return {}
        members, me = set(await self.comm.members()), self.comm.peer_id
        out = {}
        for key, value in items.items():
            peer = key[len(OUTER_PREFIX):]
            if peer != me and peer in members and self._matches(value) and _valid_record(value):
                out[peer] = value
        return out

    async def _ask(self, after: int) -> None:
        await self.comm.state_set(f"{WANT_PREFIX}{self.comm.peer_id}",
                                  {"algorithm": self.strategy.algorithm, "layout": self.layout, "after": after})

    async def _withdraw(self) -> None:
        try:
            await self.comm.state_set(f"{WANT_PREFIX}{self.comm.peer_id}", None)
        except CommError as exc:  # CommClosed included: the members drop a gone peer's ask anyway
            logger.info("could not withdraw the join request (%s)", exc)


def _candidates(records: Mapping[str, dict[str, Any]], after: int,
                refused: set[str]) -> list[tuple[tuple[int, str], list[str]]]:
    """Believable states newer than `after`, best first: newest step, then most publishers."""
    if not records:
        return []
    believable = statistics.median_low(r["step"] for r in records.values())
    by: dict[tuple[int, str], list[str]] = {}
    for peer, r in sorted(records.items()):
        if "state" in r and after < r["state_step"] <= believable and r["state"] not in refused:
            by.setdefault((r["state_step"], r["state"]), []).append(peer)
    return sorted(by.items(), key=lambda kv: (kv[0][0], len(kv[1]), kv[0][1]), reverse=True)
