"""A trio event loop in its own thread, and calls across to it from asyncio (and back).

py-libp2p is trio-only while the daemon is asyncio (aiohttp, pytest-asyncio). The libp2p host
therefore runs in one dedicated thread with its own trio loop. Calls cross with
``TrioToken.run_sync_soon`` one way and ``loop.call_soon_threadsafe`` the other: no executor thread
per call, about 0.1 ms per crossing.

Both directions carry results, exceptions and cancellation:

* asyncio -> trio (:meth:`TrioThread.run`): cancelling the awaiting asyncio task cancels the trio
  task; an exception raised in trio is re-raised in asyncio; if the trio loop shuts down under the
  call, the caller gets :class:`ClosedError`.
* trio -> asyncio (:meth:`TrioThread.call_asyncio`): cancelling the trio side cancels the asyncio
  task; its exception is re-raised in trio.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import outcome
import trio

from .errors import ClosedError

__all__ = ["TrioThread"]

log = logging.getLogger(__name__)
T = TypeVar("T")


class TrioThread:
    """Owns one thread running a trio loop with a nursery that tasks can be started in.

    Use :meth:`start` once, then :meth:`run` from asyncio, and :meth:`stop` to cancel everything
    and join the thread. ``stop`` is idempotent.
    """

    def __init__(self, name: str = "hyphae-trio") -> None:
        self._name = name
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._stopping = False
        self._crash: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the thread and wait until its loop accepts work.

        Args:
            loop: the asyncio loop that trio-side code calls back into (default: the running one).
        """
        if self._thread is not None:
            raise RuntimeError("TrioThread.start() called twice")
        self.loop = loop or asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._thread_main, name=self._name, daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._crash is not None:
            raise RuntimeError("trio thread failed to start") from self._crash

    def _thread_main(self) -> None:
        try:
            trio.run(self._trio_main)
        except BaseException as exc:  # noqa: BLE001 — report a crash of the whole loop, then end
            self._crash = exc
            log.error("trio thread crashed", exc_info=exc)
        finally:
            self._ready.set()

    async def _trio_main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await trio.sleep_forever()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Cancel every task in the trio loop and join the thread (blocking, idempotent)."""
        if self._thread is None or self._stopping:
            if self._thread is not None:
                self._thread.join(timeout_s)
            return
        self._stopping = True
        try:
            self.run_sync_soon(self._cancel_all)
        except ClosedError:
            pass
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("trio thread did not stop within %.1f s", timeout_s)

    def _cancel_all(self) -> None:
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # ---- asyncio -> trio -------------------------------------------------------------------

    def run_sync_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule a plain function in the trio thread (fire and forget; thread-safe)."""
        if self._token is None:
            raise ClosedError("the trio thread is not running")
        try:
            self._token.run_sync_soon(fn, *args)
        except trio.RunFinishedError as exc:
            raise ClosedError("the trio thread has stopped") from exc

    def start_soon(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Start a background trio task in the thread's nursery (thread-safe)."""
        self.run_sync_soon(self._start_in_nursery, afn, args)

    async def start_service(self, afn: Callable[..., Awaitable[Any]]) -> Any:
        """From the trio thread: start ``afn(task_status=...)`` in the root nursery, so it
        outlives the calling task, and return what it passes to ``task_status.started()``."""
        if self._nursery is None or self._stopping:
            raise ClosedError("the trio thread is stopping")
        return await self._nursery.start(afn)

    def _start_in_nursery(self, afn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        if self._nursery is not None and not self._stopping:
            self._nursery.start_soon(afn, *args)

    async def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run ``afn(*args)`` in the trio thread and return its result to the asyncio caller.

        Raises:
            ClosedError: the trio loop stopped before the call finished.
            Exception: whatever ``afn`` raised, unchanged.

        Cancelling the caller cancels the trio task (it is told at once; it finishes its own
        cleanup in the trio thread).
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[outcome.Outcome[T]] = loop.create_future()
        call = _TrioCall(afn, args, fut, loop, self._token)
        fut.add_done_callback(call.on_asyncio_done)
        self.run_sync_soon(self._start_call, call)
        result = await fut
        if isinstance(result, outcome.Error) and isinstance(result.error, trio.Cancelled):
            raise ClosedError("the libp2p thread is shutting down")
        return result.unwrap()

    def _start_call(self, call: _TrioCall[Any]) -> None:
        if self._nursery is None or self._stopping:
            call.deliver(outcome.Error(ClosedError("the trio thread is stopping")))
            return
        self._nursery.start_soon(call.run_in_trio)

    # ---- trio -> asyncio -------------------------------------------------------------------

    async def call_asyncio(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """From the trio thread: run ``afn(*args)`` as an asyncio task and await its result.

        Cancelling the trio caller cancels the asyncio task.
        """
        loop = self.loop
        if loop is None or loop.is_closed():
            raise ClosedError("the asyncio loop is gone")
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        box: dict[str, Any] = {}

        def finish(task: asyncio.Task[T]) -> None:
            box["task_done"] = task
            done.set()

        def begin() -> None:
            task = loop.create_task(afn(*args))
            box["task"] = task
            task.add_done_callback(lambda t: _safe_run_sync_soon(token, finish, t))

        loop.call_soon_threadsafe(begin)
        finished = False
        try:
            await done.wait()
            finished = True
        finally:
            if not finished:
                loop.call_soon_threadsafe(_cancel_task_in_box, box)
        task: asyncio.Task[T] = box["task_done"]
        if task.cancelled():
            raise ClosedError("the asyncio side cancelled the call")
        exc = task.exception()
        if exc is not None:
            raise exc
        return task.result()


class _TrioCall(Generic[T]):
    """One asyncio -> trio call: its trio cancel scope and where its result goes."""

    def __init__(self, afn: Callable[..., Awaitable[T]], args: tuple[Any, ...],
                 fut: asyncio.Future[outcome.Outcome[T]], loop: asyncio.AbstractEventLoop,
                 token: trio.lowlevel.TrioToken | None) -> None:
        self.afn, self.args, self.fut, self.loop, self.token = afn, args, fut, loop, token
        # A scope may be cancelled before it is entered: a cancel that overtakes the start wins.
        self.scope = trio.CancelScope()

    async def run_in_trio(self) -> None:
        with self.scope:
            result = await outcome.acapture(self.afn, *self.args)
            self.deliver(result)

    def deliver(self, result: outcome.Outcome[T]) -> None:
        self.loop.call_soon_threadsafe(self._set, result)

    def _set(self, result: outcome.Outcome[T]) -> None:
        if not self.fut.done():
            self.fut.set_result(result)

    def on_asyncio_done(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled() and self.token is not None:
            _safe_run_sync_soon(self.token, self.scope.cancel)


def _safe_run_sync_soon(token: trio.lowlevel.TrioToken, fn: Callable[..., Any], *args: Any) -> None:
    try:
        token.run_sync_soon(fn, *args)
    except trio.RunFinishedError:
        pass  # the trio loop is gone; nothing left to tell it


def _cancel_task_in_box(box: dict[str, Any]) -> None:
    task = box.get("task")
    if task is not None:
        task.cancel()
