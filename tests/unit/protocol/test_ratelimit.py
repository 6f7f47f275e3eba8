"""Token buckets per peer: a burst then the sustained rate; bounded memory; thread-safe."""

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hyphae.protocol.ratelimit import KeyedLimiter, KeyedSlots, RateLimit, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_a_full_bucket_allows_the_burst_then_the_rate() -> None:
    clock = Clock()
    lim = KeyedLimiter(RateLimit(rate_per_s=2, burst=5), clock=clock)
    assert [lim.allow("p") for _ in range(6)] == [True] * 5 + [False]
    clock.t = 0.5  # one token back
    assert lim.allow("p") and not lim.allow("p")
    clock.t = 100.0  # refills to the burst, not beyond
    assert sum(lim.allow("p") for _ in range(10)) == 5
    assert lim.stats()["denied"] == 7


def test_keys_are_independent_and_memory_is_bounded() -> None:
    clock = Clock()
    lim = KeyedLimiter(RateLimit(rate_per_s=1, burst=1), max_keys=3, clock=clock)
    assert lim.allow("a") and not lim.allow("a")
    assert lim.allow("b")
    for i in range(100):
        lim.allow(f"x{i}")
    assert len(lim) == 3


def test_a_clock_going_backwards_adds_no_tokens() -> None:
    bucket = TokenBucket(RateLimit(rate_per_s=10, burst=1), now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert not bucket.take(10.0)
    assert bucket.take(10.2)


@pytest.mark.parametrize("kwargs", [dict(rate_per_s=0, burst=1), dict(rate_per_s=1, burst=0.5),
                                    dict(rate_per_s=float("nan"), burst=1)])
def test_bad_limits_are_refused_with_the_value(kwargs) -> None:
    with pytest.raises(ValueError, match="must be"):
        RateLimit(**kwargs)


@settings(max_examples=300, deadline=None)
@given(st.floats(0.1, 1000), st.floats(1, 100), st.lists(st.floats(0, 5), max_size=60))
def test_never_more_than_burst_plus_rate_times_elapsed(rate: float, burst: float, gaps: list[float]) -> None:
    clock = Clock()
    lim = KeyedLimiter(RateLimit(rate_per_s=rate, burst=burst), clock=clock)
    allowed = 0
    for gap in gaps:
        clock.t += gap
        allowed += lim.allow("p")
    assert allowed <= burst + rate * clock.t + 1e-6


def test_slots_cap_per_key_and_total_and_are_thread_safe() -> None:
    slots = KeyedSlots(per_key=2, total=3)
    assert slots.acquire("a") and slots.acquire("a") and not slots.acquire("a")
    assert slots.acquire("b") and not slots.acquire("c")
    slots.release("a")
    assert slots.acquire("c")
    slots.release("zzz")  # releasing what was never held changes nothing
    assert slots.held() == 3

    big = KeyedSlots(per_key=10**6, total=10**6)

    def churn() -> None:
        for _ in range(2000):
            if big.acquire("k"):
                big.release("k")

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert big.held() == 0
