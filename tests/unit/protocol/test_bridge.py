"""asyncio <-> trio bridge: results, exceptions and cancellation cross both ways."""

import asyncio
import threading

import pytest
import trio

from hyphae.protocol._bridge import TrioThread
from hyphae.protocol.errors import ClosedError


@pytest.fixture
async def bridge():
    t = TrioThread()
    t.start()
    yield t
    t.stop()


async def test_result_returns_from_trio_thread(bridge: TrioThread) -> None:
    async def work(x: int) -> tuple[int, str]:
        await trio.sleep(0)
        return x * 2, threading.current_thread().name

    value, thread = await bridge.run(work, 21)
    assert value == 42 and thread == "hyphae-trio"


async def test_exception_crosses_unchanged(bridge: TrioThread) -> None:
    async def fail() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await bridge.run(fail)


async def test_cancelling_asyncio_caller_cancels_trio_task(bridge: TrioThread) -> None:
    cancelled = threading.Event()

    async def forever() -> None:
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    task = asyncio.create_task(bridge.run(forever))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(cancelled.wait, 2.0)


async def test_timeout_at_call_site_cancels_trio_side(bridge: TrioThread) -> None:
    cancelled = threading.Event()

    async def slow() -> None:
        try:
            await trio.sleep(10)
        finally:
            cancelled.set()

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await bridge.run(slow)
    assert await asyncio.to_thread(cancelled.wait, 2.0)


async def test_stop_fails_pending_calls_with_closed_error() -> None:
    t = TrioThread()
    t.start()
    call = asyncio.create_task(t.run(trio.sleep_forever))
    await asyncio.sleep(0.05)
    await asyncio.to_thread(t.stop)
    with pytest.raises(ClosedError):
        await call
    with pytest.raises(ClosedError):
        await t.run(trio.sleep, 0)


async def test_trio_calls_back_into_asyncio(bridge: TrioThread) -> None:
    loop_thread = threading.current_thread().name

    async def on_asyncio(x: int) -> tuple[int, str]:
        await asyncio.sleep(0)
        return x + 1, threading.current_thread().name

    async def from_trio() -> tuple[int, str]:
        return await bridge.call_asyncio(on_asyncio, 1)

    assert await bridge.run(from_trio) == (2, loop_thread)


async def test_trio_cancellation_cancels_asyncio_task(bridge: TrioThread) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def on_asyncio() -> None:
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def from_trio() -> str:
        with trio.move_on_after(0.1):
            await bridge.call_asyncio(on_asyncio)
        return "moved on"

    assert await bridge.run(from_trio) == "moved on"
    await asyncio.wait_for(cancelled.wait(), 2.0)


async def test_asyncio_exception_crosses_into_trio(bridge: TrioThread) -> None:
    async def on_asyncio() -> None:
        raise ValueError("bad")

    async def from_trio() -> str:
        try:
            await bridge.call_asyncio(on_asyncio)
        except ValueError as exc:
            return f"caught {exc}"
        return "no error"

    assert await bridge.run(from_trio) == "caught bad"
