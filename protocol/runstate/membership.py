"""Who is in the run right now: live, suspect or gone, from heartbeats in member entries. Pure.

Each member rewrites its own ``last_seen_ms`` every few seconds (a ~45-byte pycrdt delta that
anti-entropy spreads). A member's age is the time since that heartbeat by its own clock, clamped
at zero (a clock ahead of ours does not make it immortal), or, if smaller, the time since it last
talked to this node directly (published, asked or answered a sync), so a member whose clock lags
ours still looks alive to the peers it talks to. A heartbeat relayed late by a third node is
never live evidence by itself: a member that died during a partition must not look alive because
its last heartbeat was delivered after the heal.

Replicas with clocks within a second of each other (NTP) agree on ``live_members()`` except for
a second around each threshold; algorithms that pair members (NoLoCo) tolerate that by design.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["MembershipConfig", "member_status", "LIVE", "SUSPECT", "GONE"]

LIVE, SUSPECT, GONE = "live", "suspect", "gone"


@dataclass(frozen=True, kw_only=True)
class MembershipConfig:
    """Timeouts that turn heartbeat ages into a status."""

    suspect_after_s: float = 15.0
    """No heartbeat for this long: suspect (still listed, no longer in ``live_members()``).
    Heartbeats travel by anti-entropy: leave room for the interval plus a few pull rounds."""
    gone_after_s: float = 45.0
    """No heartbeat for this long, or the member said it left: gone."""
    forget_after_s: float = 3600.0
    """Gone members disappear from views after this long (their streams are kept)."""

    def __post_init__(self) -> None:
        if not 0 < self.suspect_after_s < self.gone_after_s <= self.forget_after_s:
            raise ValueError(f"need 0 < suspect_after_s < gone_after_s <= forget_after_s, got "
                             f"{self.suspect_after_s}, {self.gone_after_s}, {self.forget_after_s}")


def member_status(entry: Mapping[str, Any], now_s: float, heard_live_s: float | None,
                  config: MembershipConfig) -> tuple[str, float]:
    """Return ``(status, age_s)`` of one member entry.

    Args:
        entry: the member's section value (``last_seen_ms``, ``left``, ...).
        now_s: this node's wall clock.
        heard_live_s: when it last talked to this node directly, or None.
        config: the timeouts.
    """
    last_ms = entry.get("last_seen_ms")
    age = math.inf
    if isinstance(last_ms, int) and not isinstance(last_ms, bool):
        age = max(0.0, now_s - last_ms / 1000.0)
    if heard_live_s is not None:
        age = min(age, max(0.0, now_s - heard_live_s))
    if entry.get("left") is True or age > config.gone_after_s:
        return GONE, age
    return (LIVE if age <= config.suspect_after_s else SUSPECT), age
