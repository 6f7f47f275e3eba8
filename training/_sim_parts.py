"""Small records and helpers of the in-memory network (sim.py): peers, offers, scalar slots."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


def clone_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in tensors.items()}


def resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


def retrieve(fut: asyncio.Future) -> None:
    """Mark a finished future's exception as seen (its waiter is gone)."""
    if fut.done() and not fut.cancelled():
        fut.exception()


@dataclass(eq=False)
class SimPeer:
    id: str
    alive: bool = True
    sent: int = 0
    received: int = 0
    pending: set[asyncio.Future] = field(default_factory=set)


@dataclass(eq=False)
class Offer:
    tensors: Mapping[str, torch.Tensor]
    future: asyncio.Future


@dataclass(eq=False)
class ScalarWait:
    """Collectors waiting for the same peer list share one of these (O(1) work per publish)."""

    missing: set[str]
    future: asyncio.Future


@dataclass(eq=False)
class ScalarSlot:
    values: dict[str, tuple[bytes, float]] = field(default_factory=dict)
    waits: dict[tuple[str, ...], ScalarWait] = field(default_factory=dict)


def copy_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: copy_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [copy_plain(v) for v in value]
    return value
