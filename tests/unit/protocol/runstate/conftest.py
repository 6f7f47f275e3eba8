"""Shared helpers for the run state unit tests: fixed identities and a settable clock."""

from __future__ import annotations

import pytest

from hyphae.protocol.identity import Identity


class FakeClock:
    """A wall clock the test moves by hand (seconds)."""

    def __init__(self, now_s: float = 1_700_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


_IDS = [Identity.generate() for _ in range(6)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ids() -> list[Identity]:
    """Six identities, sorted by peer id (so ``ids[0]`` sorts first)."""
    return sorted(_IDS, key=lambda i: i.peer_id)
