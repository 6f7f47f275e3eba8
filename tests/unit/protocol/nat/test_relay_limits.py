"""The relay's rate limiter: a token bucket of one second that callers sleep off."""

import trio
import trio.testing

from hyphae.protocol.nat.relay_server import _Bucket


def test_a_bucket_holds_the_rate_to_its_limit() -> None:
    async def main() -> None:
        bucket = _Bucket(1000)
        start = trio.current_time()
        for _ in range(50):  # 50 x 100 bytes = 5000 bytes at 1000 B/s with a 1000-byte burst
            await bucket.take(100)
        assert abs((trio.current_time() - start) - 4.0) < 0.05

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_rate_zero_means_unlimited() -> None:
    async def main() -> None:
        bucket = _Bucket(0)
        start = trio.current_time()
        await bucket.take(10**9)
        assert trio.current_time() == start

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
