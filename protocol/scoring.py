"""Per-peer misbehaviour scores: handlers report violations, the daemon disconnects the worst.

Pure and thread-safe (pubsub validators report from the libp2p thread, stream handlers from the
asyncio loop). A peer starts at 0; each reported violation subtracts its severity's weight; the
score decays back toward 0 with a half-life, so an honest peer that tripped a limit once (a
burst after a reconnect, a message of a newer version) recovers, while one that keeps
misbehaving sinks below ``disconnect_below``. Something outside this module acts on that
(:mod:`hyphae.node.peer_scores` disconnects the peer and keeps it banned for ``ban_s``): the
handlers only report, so scoring policy is one place, not sprinkled over the protocols.

Severities, and what each is for:

* ``MINOR`` (1): could be an honest accident — over a rate limit, a message refused as
  malformed by a lenient check, a stream broken mid-frame.
* ``MAJOR`` (10): a protocol violation on an authenticated stream — bad framing, schema or
  size, a message that cannot have come from a correct implementation.
* ``SEVERE`` (50): an authenticated lie — equivocation (two different values for one slot), a
  signature that does not verify, a training update rejected as garbage.

With the defaults (-100, half-life 5 min) a peer is dropped after ~2 severe, ~10 major or ~100
minor violations in quick succession.

Each local identity (so each :class:`~hyphae.protocol.host.Host`) has one table, found with
:func:`scores_for`, so the handlers of different protocols on one host add into the same score
without being wired together — including those that only see a libp2p stream (they know the
local peer id from its connection).
"""

from __future__ import annotations

import enum
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Severity", "ScoringConfig", "PeerScores", "scores_for"]

Clock = Callable[[], float]
Listener = Callable[[str, float], None]


class Severity(enum.Enum):
    """How bad one violation is; the value is the score it costs."""

    MINOR = 1.0
    MAJOR = 10.0
    SEVERE = 50.0


@dataclass(frozen=True, kw_only=True)
class ScoringConfig:
    """Scoring policy (defaults fit the daemon; tests shrink the times)."""

    half_life_s: float = 300.0
    """A score halves toward 0 every this many seconds without new violations."""
    disconnect_below: float = -100.0
    """A peer whose score falls to this or below is to be disconnected."""
    ban_s: float = 600.0
    """After a disconnect for score, how long the peer counts as banned (refused again)."""
    max_peers: int = 10_000
    """Peers remembered (least recently reported forgotten first): memory stays bounded."""
    max_kinds: int = 32
    """Distinct violation names counted per peer (the rest are counted as 'other')."""

    def __post_init__(self) -> None:
        if not self.half_life_s > 0:
            raise ValueError(f"half_life_s must be > 0, got {self.half_life_s!r}")
        if not self.disconnect_below < 0:
            raise ValueError(f"disconnect_below must be < 0 (scores start at 0), got {self.disconnect_below!r}")
        if not self.ban_s >= 0:
            raise ValueError(f"ban_s must be >= 0, got {self.ban_s!r}")
        for name in ("max_peers", "max_kinds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class _Record:
    score: float = 0.0
    stamp: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    last: str = ""
    last_detail: str = ""
    last_at: float = 0.0
    flagged: bool = False
    banned_until: float = 0.0
    disconnects: int = 0


class PeerScores:
    """The score table of one host.

    Args:
        config: thresholds and decay.
        clock: seconds (wall clock by default, so ``last_at`` is meaningful in the API).
    """

    def __init__(self, config: ScoringConfig | None = None, *, clock: Clock = time.time) -> None:
        self.config = config or ScoringConfig()
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self._lock = threading.Lock()
        self._listeners: list[Listener] = []
        self.reports = 0

    # ---- reporting -------------------------------------------------------------------------

    def report(self, peer_id: str, what: str, severity: Severity, detail: str = "") -> float:
        """Record one violation by ``peer_id``; returns its new score.

        ``what`` is a short stable name (``"runsync.malformed"``, ``"scalar.rate"``); ``detail``
        is free text for the API (truncated). Listeners are told, in the reporting thread, when
        the peer first crosses ``disconnect_below``.
        """
        now = self._clock()
        crossed = False
        with self._lock:
            rec = self._records.get(peer_id)
            if rec is None:
                rec = self._records[peer_id] = _Record(stamp=now)
                if len(self._records) > self.config.max_peers:
                    self._records.popitem(last=False)
            else:
                self._records.move_to_end(peer_id)
            rec.score = self._decayed(rec, now) - severity.value
            rec.stamp = now
            kind = what[:64] if (what in rec.counts or len(rec.counts) < self.config.max_kinds) else "other"
            rec.counts[kind] = rec.counts.get(kind, 0) + 1
            rec.last, rec.last_detail, rec.last_at = what[:64], detail[:200], now
            self.reports += 1
            if rec.score <= self.config.disconnect_below and not rec.flagged:
                rec.flagged = crossed = True
            score = rec.score
            listeners = list(self._listeners) if crossed else []
        for listener in listeners:
            listener(peer_id, score)
        return score

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(peer_id, score)`` when a peer crosses the threshold (in whatever
        thread reported it: hop to your own loop before doing anything slow)."""
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

    # ---- reading ---------------------------------------------------------------------------

    def score(self, peer_id: str) -> float:
        """The peer's current (decayed) score; 0 for a peer never reported."""
        with self._lock:
            rec = self._records.get(peer_id)
            return 0.0 if rec is None else self._decayed(rec, self._clock())

    def over_threshold(self) -> list[str]:
        """Peers flagged (crossed the threshold) and not yet handled by :meth:`mark_disconnected`."""
        with self._lock:
            return [p for p, rec in self._records.items() if rec.flagged]

    def mark_disconnected(self, peer_id: str) -> None:
        """The peer was disconnected for its score: ban it for ``ban_s`` and clear the flag."""
        now = self._clock()
        with self._lock:
            rec = self._records.get(peer_id)
            if rec is None:
                return
            rec.flagged = False
            rec.banned_until = now + self.config.ban_s
            rec.disconnects += 1

    def is_banned(self, peer_id: str) -> bool:
        """True while a peer disconnected for its score is within its ban (or still flagged).

        Hook for admission: refuse (or drop right after hello) a banned peer."""
        now = self._clock()
        with self._lock:
            rec = self._records.get(peer_id)
            return rec is not None and (rec.flagged or rec.banned_until > now)

    def scores(self) -> dict[str, dict[str, Any]]:
        """Every remembered peer, worst first: score, counts by violation, last violation, ban."""
        now = self._clock()
        with self._lock:
            rows = {
                peer: {
                    "score": round(self._decayed(rec, now), 3),
                    "violations": dict(rec.counts),
                    "last": rec.last,
                    "last_detail": rec.last_detail,
                    "last_at": rec.last_at,
                    "banned": rec.flagged or rec.banned_until > now,
                    "banned_until": rec.banned_until or None,
                    "disconnects": rec.disconnects,
                }
                for peer, rec in self._records.items()
            }
        return dict(sorted(rows.items(), key=lambda kv: (kv[1]["score"], kv[0])))

    def __len__(self) -> int:
        return len(self._records)

    def _decayed(self, rec: _Record, now: float) -> float:
        elapsed = max(0.0, now - rec.stamp)
        return rec.score * math.pow(0.5, elapsed / self.config.half_life_s)


_TABLES: dict[str, PeerScores] = {}
_TABLES_LOCK = threading.Lock()


def scores_for(owner: Any) -> PeerScores:
    """The score table of the local node ``owner`` — its peer id, or anything with a
    ``peer_id`` (a Host) — made on first use.

    Keyed by peer id rather than by object so that handlers seeing only a stream find the same
    table, and a host restarted in the same process keeps its bans. One table per local
    identity a process ever runs: a handful.
    """
    key = owner if isinstance(owner, str) else str(owner.peer_id)
    with _TABLES_LOCK:
        table = _TABLES.get(key)
        if table is None:
            table = _TABLES[key] = PeerScores()
        return table
