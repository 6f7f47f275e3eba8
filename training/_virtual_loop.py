"""An asyncio event loop on virtual time, for simulations that must not really sleep.

`VirtualTimeLoop` is a plain `SelectorEventLoop` whose `time()` is a counter. When the loop has
nothing ready to run and would block in `select(timeout)` waiting for its next timer, the
virtual selector advances the counter by `timeout` instead of waiting. So `asyncio.sleep`,
`asyncio.timeout` and `loop.call_later` all work unchanged, a simulated 100 s round trip costs
nothing, and the order of events is exactly the order of their virtual times.

Real I/O still works (it is polled without waiting); work in other threads does not advance or
hold the clock, so keep simulations single-threaded (torch ops inline, no `to_thread`).
Only public asyncio APIs are used: the `selector=` argument and an overridden `time()`.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class _VirtualSelector(selectors.BaseSelector):
    """Polls real file descriptors without blocking; a wait for a timer advances the clock."""

    def __init__(self, loop: VirtualTimeLoop) -> None:
        self._inner = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj, events, data=None):  # type: ignore[no-untyped-def]
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj):  # type: ignore[no-untyped-def]
        return self._inner.unregister(fileobj)

    def modify(self, fileobj, events, data=None):  # type: ignore[no-untyped-def]
        return self._inner.modify(fileobj, events, data)

    def select(self, timeout: float | None = None):  # type: ignore[no-untyped-def]
        if timeout is None:  # no timer pending: only real I/O (or another thread) can wake us
            return self._inner.select(None)
        events = self._inner.select(0)
        if not events and timeout > 0:
            self._loop.advance(timeout)
        return events

    def close(self) -> None:
        self._inner.close()

    def get_map(self):  # type: ignore[no-untyped-def]
        return self._inner.get_map()


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock starts at 0 and jumps to the next timer when idle."""

    def __init__(self) -> None:
        self._virtual_now = 0.0
        super().__init__(selector=_VirtualSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        """Move the clock forward (the selector calls this; tests may too)."""
        if seconds < 0:
            raise ValueError(f"time only moves forward; got advance({seconds})")
        self._virtual_now += seconds


def run_virtual(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh `VirtualTimeLoop` (like `asyncio.run`)."""
    with asyncio.Runner(loop_factory=VirtualTimeLoop) as runner:
        return runner.run(main)
