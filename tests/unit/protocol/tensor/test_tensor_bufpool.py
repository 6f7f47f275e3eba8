"""Receive buffers are reused only once nothing references them, and the pool stays bounded."""

from hyphae.protocol.tensor._bufpool import BufferPool

MiB = 1 << 20


def test_a_buffer_is_reused_only_after_every_view_of_it_is_gone() -> None:
    pool = BufferPool(64 * MiB)
    a = pool.take(3 * MiB)
    a[:] = 1
    view = memoryview(a)[10:20]
    del a
    b = pool.take(3 * MiB)  # the first is still referenced by `view`
    assert pool.reused == 0
    del view, b
    c = pool.take(3 * MiB - 5)
    assert pool.reused == 1 and c.size == 3 * MiB - 5


def test_small_buffers_are_not_pooled_and_the_pool_is_bounded() -> None:
    pool = BufferPool(8 * MiB)
    assert pool.take(1000).size == 1000 and pool.kept_bytes == 0
    held = [pool.take(3 * MiB) for _ in range(5)]
    assert pool.kept_bytes <= 8 * MiB
    assert all(h.size == 3 * MiB for h in held)  # buffers dropped from the pool stay valid
    held[0][:] = 7
    assert held[0][-1] == 7


def test_idle_buffers_are_released_after_a_while() -> None:
    pool = BufferPool(64 * MiB, idle_s=10)
    buf = pool.take(2 * MiB)
    del buf
    pool.trim(now=1e12)
    assert pool.kept_bytes == 0
