"""The envelope log: what one replica holds of every stream, and how envelopes merge. Pure.

A stream ``(author, section)`` is a chain ``[snapshot(epoch, 0), delta 1, ..., delta n]`` of
signed envelopes, all from ``author``. A replica keeps, per stream, the chain of the newest epoch
it has a snapshot for, and the section value that chain produces. Merging is offering envelopes:

* a newer epoch's snapshot replaces the whole stream (the author compacts by starting a new epoch
  from a fresh document, so nothing from the old epoch is needed any more);
* the next delta of the current epoch is applied; a delta past a gap, or of a newer epoch whose
  snapshot has not arrived, waits in a bounded pending buffer until the gap fills;
* an older epoch, or a seq already held with the same digest, changes nothing.

Every envelope is signature-checked and applied to a scratch document, and its result checked
against the section's rule, before the replica keeps it; a rejected envelope is never stored, so
it is never served to anyone. For envelopes of authors that do not fork, the replica state is a
function of the *set* of envelopes offered, whatever the order, grouping or duplication: merge
is commutative, associative and idempotent (tests/unit/protocol/runstate/test_log.py).

An author that signs two different envelopes for the same ``(epoch, seq)`` (a fork, which an
honest author never does: every process starts a new epoch) is recorded in ``equivocators``;
the first one seen is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .doc import Materialized, materialize
from .rules import RuleContext, SectionRule, WriteRejected
from .wire import TIP_BYTES, Envelope, Head, verify_envelope

__all__ = ["Stream", "Outcome", "Offer", "Replica", "merge_into"]

log = logging.getLogger(__name__)

Key = tuple[str, str]


@dataclass
class Stream:
    """The chain a replica holds for one ``(author, section)`` and the value it produces."""

    author: str
    section: str
    epoch: int
    envelopes: list[Envelope]
    section_doc: Materialized
    log_bytes: int = 0

    @property
    def state(self) -> bytes:
        return self.section_doc.state

    @property
    def value(self) -> dict[str, Any]:
        return self.section_doc.value

    @property
    def seq(self) -> int:
        return len(self.envelopes) - 1

    @property
    def head(self) -> Head:
        return Head(self.epoch, self.seq, self.envelopes[-1].digest[:TIP_BYTES])


class Outcome(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    STALE = "stale"
    BUFFERED = "buffered"
    DROPPED = "dropped"
    REJECTED = "rejected"


@dataclass(frozen=True)
class Offer:
    """What became of one offered envelope. ``applied`` lists every envelope that took effect
    because of it, in order (the envelope itself, then pending ones it unblocked)."""

    outcome: Outcome
    reason: str = ""
    applied: tuple[Envelope, ...] = ()


@dataclass
class _Limits:
    max_streams: int
    max_pending_per_stream: int
    max_pending: int


class Replica:
    """Every stream of one run as this node holds it.

    Args:
        run: the run name; envelopes for another run are rejected.
        rules: the rule table (section -> rule); envelopes of other sections are rejected.
        max_streams: streams held at most (bounds what a flood of new identities can cost).
        max_pending_per_stream, max_pending: out-of-order envelopes kept waiting for a gap.
    """

    def __init__(self, run: str, rules: Mapping[str, SectionRule], *, max_streams: int = 16384,
                 max_pending_per_stream: int = 256, max_pending: int = 8192) -> None:
        self.run = run
        self.rules = dict(rules)
        self.streams: dict[Key, Stream] = {}
        self.equivocators: set[str] = set()
        self._pending: dict[Key, dict[tuple[int, int], Envelope]] = {}
        self._pending_count = 0
        self._limits = _Limits(max_streams, max_pending_per_stream, max_pending)

    # ---- offering ----------------------------------------------------------------------------

    def offer(self, env: Envelope, ctx: RuleContext, *, verified: bool = False) -> Offer:
        """Take ``env`` into the replica if it is valid and new. Never raises on bad input.

        Args:
            env: a decoded envelope (its signature is checked here unless ``verified``).
            ctx: what rules may depend on (owner, delegations).
            verified: the caller already checked the signature (its own writes).
        """
        if env.run != self.run:
            return Offer(Outcome.REJECTED, f"envelope is for run {env.run!r}, this replica holds {self.run!r}")
        rule = self.rules.get(env.section)
        if rule is None:
            return Offer(Outcome.REJECTED, f"unknown section {env.section!r} (known: {', '.join(sorted(self.rules))})")
        stream = self.streams.get(env.key)
        if stream is not None and env.epoch < stream.epoch:
            return Offer(Outcome.STALE)
        if stream is not None and env.epoch == stream.epoch and env.seq <= stream.seq:
            if stream.envelopes[env.seq].digest == env.digest:
                return Offer(Outcome.DUPLICATE)
            if not verified and not verify_envelope(env):
                return Offer(Outcome.REJECTED, "bad signature")
            self.equivocators.add(env.author)
            return Offer(Outcome.REJECTED, f"{env.author} signed two different envelopes for {env.section} "
                                           f"epoch {env.epoch} seq {env.seq}; keeping the first")
        if self._is_pending(env):
            return Offer(Outcome.DUPLICATE)
        if not verified and not verify_envelope(env):
            return Offer(Outcome.REJECTED, f"bad signature on an envelope claiming to be from {env.author}")
        if stream is None and len(self.streams) >= self._limits.max_streams:
            return Offer(Outcome.DROPPED, f"replica holds {len(self.streams)} streams, limit {self._limits.max_streams}")
        ready = (env.seq == 0 and (stream is None or env.epoch > stream.epoch)) or (
            stream is not None and env.epoch == stream.epoch and env.seq == stream.seq + 1)
        if not ready:
            return self._buffer(env)
        try:
            self._apply(env, rule, ctx)
        except WriteRejected as exc:
            return Offer(Outcome.REJECTED, str(exc))
        return Offer(Outcome.APPLIED, applied=(env, *self._drain(env.key, ctx)))

    def _apply(self, env: Envelope, rule: SectionRule, ctx: RuleContext) -> None:
        stream = self.streams.get(env.key)
        if env.is_snapshot:
            section = materialize([env.update], rule, stream.section_doc if stream else None)
            rule.check(env.author, stream.value if stream else {}, section.value, ctx)
            self.streams[env.key] = Stream(env.author, env.section, env.epoch, [env], section)
            self._purge_pending(env.key)
            return
        assert stream is not None  # offer() applies a delta only on top of its epoch's chain
        max_deltas = 2 * rule.compact_after_deltas
        if env.seq > max_deltas or stream.log_bytes + len(env.update) > 2 * rule.max_state_bytes:
            raise WriteRejected(f"{env.section} of {env.author} has {env.seq} deltas / "
                                f"{stream.log_bytes + len(env.update)} bytes since its snapshot, limit {max_deltas} / "
                                f"{2 * rule.max_state_bytes}; the author must start a new epoch (compact)")
        section = materialize([stream.state, env.update], rule, stream.section_doc)
        rule.check(env.author, stream.value, section.value, ctx)
        stream.envelopes.append(env)
        stream.section_doc = section
        stream.log_bytes += len(env.update)

    def _drain(self, key: Key, ctx: RuleContext) -> list[Envelope]:
        """Apply pending envelopes that the last application unblocked."""
        applied: list[Envelope] = []
        while self._pending.get(key):
            stream, waiting = self.streams[key], self._pending[key]
            newer = [epoch for (epoch, seq) in waiting if seq == 0 and epoch > stream.epoch]
            nxt = (max(newer), 0) if newer else (stream.epoch, stream.seq + 1)
            env = waiting.pop(nxt, None)
            if env is None:
                break
            self._pending_count -= 1
            try:
                self._apply(env, self.rules[env.section], ctx)
            except WriteRejected as exc:
                log.info("dropped a pending %s envelope from %s: %s", env.section, env.author, exc)
                continue
            applied.append(env)
        self._purge_pending(key)
        return applied

    def _is_pending(self, env: Envelope) -> bool:
        held = self._pending.get(env.key, {}).get((env.epoch, env.seq))
        return held is not None and held.digest == env.digest

    def _buffer(self, env: Envelope) -> Offer:
        waiting = self._pending.setdefault(env.key, {})
        if (len(waiting) >= self._limits.max_pending_per_stream
                or self._pending_count >= self._limits.max_pending):
            return Offer(Outcome.DROPPED, "pending buffer full; anti-entropy will bring it again")
        if (env.epoch, env.seq) not in waiting:
            waiting[(env.epoch, env.seq)] = env
            self._pending_count += 1
        return Offer(Outcome.BUFFERED)

    def _purge_pending(self, key: Key) -> None:
        """Forget pending envelopes the stream has moved past."""
        stream, waiting = self.streams.get(key), self._pending.get(key)
        if stream is None or waiting is None:
            return
        for pos in [p for p in waiting if p[0] < stream.epoch or (p[0] == stream.epoch and p[1] <= stream.seq)]:
            del waiting[pos]
            self._pending_count -= 1
        if not waiting:
            del self._pending[key]

    # ---- anti-entropy ------------------------------------------------------------------------

    def heads(self) -> dict[Key, Head]:
        return {key: stream.head for key, stream in self.streams.items()}

    def missing_for(self, heads: Mapping[Key, Head], max_bytes: int) -> tuple[list[Envelope], bool]:
        """Envelopes a replica at ``heads`` lacks, in an order it can apply (higher-priority
        sections first, each stream's chain in order), cut at about ``max_bytes``.

        Returns:
            (envelopes, more): ``more`` is True when the budget cut the answer short.
        """
        out: list[Envelope] = []
        size = 0
        order = sorted(self.streams.items(), key=lambda kv: (self.rules[kv[0][1]].priority, kv[0]))
        for key, stream in order:
            start = self._start_for(stream, heads.get(key))
            for env in stream.envelopes[start:] if start is not None else ():
                if out and size + env.size_bytes > max_bytes:
                    return out, True
                out.append(env)
                size += env.size_bytes
        return out, False

    @staticmethod
    def _start_for(stream: Stream, head: Head | None) -> int | None:
        """Index of the first envelope a replica at ``head`` lacks, or None if it lacks none."""
        if head is None or head.epoch < stream.epoch:
            return 0
        if head.epoch > stream.epoch:
            return None
        if head.seq >= stream.seq:
            # Same length but a different tip is a fork: send the whole chain so the other
            # side sees the conflict (and records the equivocator) instead of missing it.
            return 0 if head.seq == stream.seq and head.tip != stream.head.tip else None
        if stream.envelopes[head.seq].digest[:TIP_BYTES] == head.tip:
            return head.seq + 1
        return 0

    def lacks(self, heads: Mapping[Key, Head]) -> bool:
        """True if a replica at ``heads`` holds something this one does not."""
        for key, head in heads.items():
            stream = self.streams.get(key)
            if key[1] not in self.rules:
                continue
            if stream is None or head.epoch > stream.epoch or (head.epoch == stream.epoch and head.seq > stream.seq):
                return True
        return False

    # ---- reading -----------------------------------------------------------------------------

    def values(self, section: str) -> dict[str, dict[str, Any]]:
        """``author -> value`` of every stream of ``section``."""
        return {author: s.value for (author, sec), s in self.streams.items() if sec == section}

    def envelopes(self) -> Iterator[Envelope]:
        """Every envelope the replica holds (chains, then pending), for saving and merging."""
        for stream in self.streams.values():
            yield from stream.envelopes
        for waiting in self._pending.values():
            yield from waiting.values()

    def fingerprint(self) -> dict[Key, tuple[int, tuple[bytes, ...]]]:
        """What the replica holds, comparable across replicas: ``key -> (epoch, digests)``."""
        return {key: (s.epoch, tuple(e.digest for e in s.envelopes)) for key, s in sorted(self.streams.items())}

    def stats(self) -> dict[str, int]:
        return {
            "streams": len(self.streams),
            "envelopes": sum(len(s.envelopes) for s in self.streams.values()),
            "log_bytes": sum(sum(len(e.update) for e in s.envelopes) for s in self.streams.values()),
            "state_bytes": sum(len(s.state) for s in self.streams.values()),
            "pending": self._pending_count,
            "equivocators": len(self.equivocators),
        }


def merge_into(replica: Replica, envelopes: Iterable[Envelope], ctx: RuleContext) -> list[Envelope]:
    """Offer ``envelopes`` (sorted so that rules see what they depend on); return those applied."""
    applied: list[Envelope] = []
    for env in sorted(envelopes, key=lambda e: (replica.rules[e.section].priority if e.section in replica.rules
                                                 else 1 << 30, e.author, e.section, e.epoch, e.seq)):
        applied.extend(replica.offer(env, ctx).applied)
    return applied
