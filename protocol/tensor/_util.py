"""Small asyncio helpers of the tensor plane."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from ..errors import HyphaeError

__all__ = ["run_all", "first_error"]


def first_error(group: BaseExceptionGroup[Any]) -> BaseException:
    """The exception to show for a failed group: the first hyphae error, else the first leaf."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    return next((e for e in leaves if isinstance(e, HyphaeError)), leaves[0])


async def run_all(*coros: Coroutine[Any, Any, Any]) -> list[Any]:
    """Run coroutines concurrently in a TaskGroup; return their results in order.

    The first failure cancels the rest and is raised as itself (not wrapped in a group), so
    callers can ``except PeerError`` as usual.
    """
    try:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(c) for c in coros]
    except ExceptionGroup as group:
        raise first_error(group) from None
    return [t.result() for t in tasks]
