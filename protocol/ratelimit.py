"""Rate limits for what peers send: token buckets, per peer, with bounded memory.

Pure (no I/O; the clock is injectable) and thread-safe: pubsub validators run in the libp2p
thread while stream handlers run in the daemon's asyncio loop, and both may charge the same
peer's bucket.

Why token buckets: an honest peer's traffic is bursty (a sync after a reconnect, a round of
requests at an outer step) but its long-run rate is low, so each limit is a sustained rate plus
a burst allowance. A peer over its limit is refused (cheaply, before any decoding work where the
caller can arrange it) and, by the caller, reported to :mod:`.scoring`.

Memory is bounded by ``max_keys``: the least recently seen keys are forgotten first. A forgotten
key comes back with a full bucket, so an attacker that cycles through more keys than the table
holds gains one burst per key, never unbounded memory on our side.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = ["RateLimit", "TokenBucket", "KeyedLimiter", "KeyedSlots"]

Clock = Callable[[], float]


@dataclass(frozen=True, kw_only=True)
class RateLimit:
    """A sustained rate with a burst allowance."""

    rate_per_s: float
    """Tokens added per second (the long-run number of messages per second allowed)."""
    burst: float
    """Bucket size: how many messages may arrive at once after a quiet period."""

    def __post_init__(self) -> None:
        if not self.rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {self.rate_per_s!r}; use a large rate to mean 'unlimited'")
        if not self.burst >= 1:
            raise ValueError(f"burst must be >= 1 (one message must always fit), got {self.burst!r}")


class TokenBucket:
    """One bucket: starts full, refills at ``rate_per_s`` up to ``burst``. Not thread-safe alone
    (:class:`KeyedLimiter` locks around it)."""

    __slots__ = ("rate_per_s", "burst", "_tokens", "_stamp")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.rate_per_s = limit.rate_per_s
        self.burst = limit.burst
        self._tokens = limit.burst
        self._stamp = now

    def tokens(self, now: float) -> float:
        """Tokens available at ``now`` (a clock going backwards adds nothing)."""
        return min(self.burst, self._tokens + max(0.0, now - self._stamp) * self.rate_per_s)

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Spend ``cost`` tokens if available; False (and nothing spent) otherwise."""
        available = self.tokens(now)
        self._stamp = max(self._stamp, now)
        if available >= cost:
            self._tokens = available - cost
            return True
        self._tokens = available
        return False


class KeyedLimiter:
    """One :class:`TokenBucket` per key (typically a peer id), at most ``max_keys`` of them.

    Args:
        limit: the rate and burst of every key's bucket.
        max_keys: keys remembered; the least recently charged are forgotten first.
        clock: seconds, monotonic (injectable for tests).
    """

    def __init__(self, limit: RateLimit, *, max_keys: int = 4096, clock: Clock = time.monotonic) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be an int >= 1, got {max_keys!r}")
        self.limit = limit
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()
        self._lock = threading.Lock()
        self.allowed = 0
        self.denied = 0

    def allow(self, key: Hashable, cost: float = 1.0) -> bool:
        """Charge ``key`` ``cost`` tokens; True if it was within its limit."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                bucket = self._buckets[key] = TokenBucket(self.limit, now)
                if len(self._buckets) > self.max_keys:
                    self._buckets.popitem(last=False)
            else:
                self._buckets.move_to_end(key)
            ok = bucket.take(now, cost)
            if ok:
                self.allowed += 1
            else:
                self.denied += 1
            return ok

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._buckets.pop(key, None)

    def __len__(self) -> int:
        return len(self._buckets)

    def stats(self) -> dict[str, int]:
        return {"allowed": self.allowed, "denied": self.denied, "keys": len(self._buckets)}


class KeyedSlots:
    """At most ``per_key`` concurrent things per key and ``total`` overall (e.g. requests being
    answered for one peer): :meth:`acquire` says yes or no at once, never waits.

    Thread-safe. Every successful :meth:`acquire` must be paired with one :meth:`release`.
    """

    def __init__(self, *, per_key: int, total: int) -> None:
        for name, value in (("per_key", per_key), ("total", total)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        self.per_key = per_key
        self.total = total
        self._held: dict[Hashable, int] = {}
        self._count = 0
        self._lock = threading.Lock()
        self.denied = 0

    def acquire(self, key: Hashable) -> bool:
        with self._lock:
            held = self._held.get(key, 0)
            if held >= self.per_key or self._count >= self.total:
                self.denied += 1
                return False
            self._held[key] = held + 1
            self._count += 1
            return True

    def release(self, key: Hashable) -> None:
        with self._lock:
            held = self._held.get(key, 0)
            if held <= 0:
                return
            self._count -= 1
            if held == 1:
                del self._held[key]
            else:
                self._held[key] = held - 1

    def held(self, key: Hashable | None = None) -> int:
        """Slots in use by ``key`` (all keys when None)."""
        with self._lock:
            return self._count if key is None else self._held.get(key, 0)
