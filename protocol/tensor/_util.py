"""Small asyncio helpers of the tensor plane."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ..errors import HyphaeError
from .spec import Tensor, TensorSpec, check_unique_names

__all__ = ["run_all", "first_error", "guarded", "specs_of"]


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


async def guarded(log: logging.Logger, name: str, fn: Callable[..., Coroutine[Any, Any, Any]], *args: Any) -> None:
    """Run a background task; a bug in it is logged, never raised into the owner's task group."""
    try:
        await fn(*args)
    except HyphaeError as exc:
        log.debug("%s ended: %s", name, exc)
    except Exception:  # noqa: BLE001 — one failed task must not take the plane (and daemon) down
        log.exception("%s failed", name)


def specs_of(tensors: Sequence[Tensor]) -> tuple[TensorSpec, ...]:
    """The specs of one transfer's tensors; ValueError if two share a name."""
    specs = tuple(t.spec for t in tensors)
    check_unique_names(specs)
    return specs
