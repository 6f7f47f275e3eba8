"""Progress of one blob fetch: bytes, rate, ETA, and when a log line is due (no I/O here).

The rate is measured over the last ``window_s`` seconds, so a fetch that lost a provider shows
its new speed within seconds rather than an average since it started. Log lines are quiet: one
once both ``line_every_s`` have passed and another ``line_step`` of the blob has arrived since
the last, or after ``stall_s`` whatever the progress (a stalled fetch still says where it is).
"""

from __future__ import annotations

from collections import deque

__all__ = ["FetchProgress"]


class FetchProgress:
    """Bytes of a fetch over time; the caller passes the clock (``now``, seconds)."""

    def __init__(self, size_bytes: int, done_bytes: int, now: float, *, window_s: float = 5.0,
                 line_every_s: float = 5.0, line_step: float = 0.1, stall_s: float = 60.0) -> None:
        self.size_bytes = size_bytes
        self.done_bytes = done_bytes
        self.resumed_bytes = done_bytes
        """Bytes already here when the fetch started (from an interrupted earlier one)."""
        self.started = now
        self._window_s, self._every_s, self._step, self._stall_s = window_s, line_every_s, line_step, stall_s
        self._samples: deque[tuple[float, int]] = deque([(now, done_bytes)])
        self._line_at, self._line_bytes = now, done_bytes

    def add(self, nbytes: int, now: float) -> None:
        self.done_bytes += nbytes
        self._samples.append((now, self.done_bytes))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self._window_s:
            self._samples.popleft()

    def rate_bps(self, now: float) -> float:
        """Bytes per second over the last ``window_s`` (0 until a second sample)."""
        t0, b0 = self._samples[0]
        for t, b in self._samples:  # the oldest sample still inside the window
            if t >= now - self._window_s:
                break
            t0, b0 = t, b
        return (self.done_bytes - b0) / (now - t0) if now > t0 else 0.0

    def eta_s(self, now: float) -> float | None:
        """Seconds left at the current rate (None while no rate is known)."""
        rate = self.rate_bps(now)
        return (self.size_bytes - self.done_bytes) / rate if rate > 0 else None

    def line_due(self, now: float) -> bool:
        """Whether a progress line should be logged now; True also marks it logged."""
        stepped = self.done_bytes - self._line_bytes >= self._step * self.size_bytes
        if (now - self._line_at >= self._every_s and stepped) or now - self._line_at >= self._stall_s:
            self._line_at, self._line_bytes = now, self.done_bytes
            return True
        return False

    def describe(self, now: float) -> str:
        eta = self.eta_s(now)
        share = self.done_bytes / self.size_bytes if self.size_bytes else 1.0
        return (f"{_size(self.done_bytes)} of {_size(self.size_bytes)} ({share:.0%}) at "
                f"{_size(self.rate_bps(now))}/s, ETA {'?' if eta is None else f'{eta:.0f} s'}")

    def summary(self, now: float) -> str:
        """The closing line's numbers: bytes fetched this time and the average rate."""
        took = max(now - self.started, 1e-9)
        fetched = self.done_bytes - self.resumed_bytes
        resumed = f", {_size(self.resumed_bytes)} already here" if self.resumed_bytes else ""
        return f"{_size(fetched)} in {took:.1f} s ({_size(fetched / took)}/s{resumed})"


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
