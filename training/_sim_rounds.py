"""Bookkeeping of the simulated all-reduce: rounds, their closing rule, the reduction itself.

A round is keyed by its tag. It expects the live members of the group its first contributor
named; it closes when every expected member still alive has contributed, or `timeout_s` after
it opened, whichever comes first. Closed rounds are kept for a while so a late contributor can
still receive the result. The reduction runs once per round, in sorted peer order and float64,
so the result does not depend on arrival order and every peer gets the same bits.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class Round:
    """One all-reduce round in progress (or recently closed)."""

    tag: str
    op: str
    expected: set[str]
    contributions: dict[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    waiters: dict[str, asyncio.Future] = field(default_factory=dict)
    spec: dict[str, tuple[tuple[int, ...], torch.dtype]] | None = None
    closed: bool = False
    result: dict[str, torch.Tensor] | None = None
    included: tuple[str, ...] = ()
    duration_s: float = 0.0
    deadline: asyncio.TimerHandle | None = None

    def contribute(self, peer: str, tensors: Mapping[str, torch.Tensor], op: str) -> None:
        """Record `peer`'s tensors (by reference: the caller is suspended until the round ends).

        Raises:
            ValueError: op differs from the round's, or names/shapes/dtypes differ, or "mean"
                of non-floating tensors.
        """
        if op != self.op:
            raise ValueError(f"all_reduce {self.tag!r}: op {op!r} differs from the round's {self.op!r}")
        spec = {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()}
        if self.spec is None:
            if op == "mean":
                bad = [k for k, (_, dt) in spec.items() if not dt.is_floating_point]
                if bad:
                    raise ValueError(f"all_reduce mean needs floating tensors; {bad} are not; use op='sum'")
            self.spec = spec
        elif spec != self.spec:
            diff = sorted(set(spec.items()) ^ set(self.spec.items()), key=str)[:4]
            raise ValueError(
                f"all_reduce {self.tag!r}: {peer}'s tensors do not match the round's "
                f"(names/shapes/dtypes differ, e.g. {diff}); every member must send the same layout"
            )
        if peer in self.contributions:
            raise ValueError(f"all_reduce {self.tag!r}: {peer} already contributed to this round")
        self.contributions[peer] = tensors
        self.expected.add(peer)

    def withdraw(self, peer: str) -> None:
        """Forget `peer` (it was cancelled or lost): the round no longer waits for it."""
        self.expected.discard(peer)
        self.contributions.pop(peer, None)
        self.waiters.pop(peer, None)

    drop = withdraw

    def complete(self) -> bool:
        return all(p in self.contributions for p in self.expected)


class RoundBook:
    """Open rounds by tag, plus the last `retention` closed ones."""

    def __init__(self, *, retention: int) -> None:
        self._open: dict[str, Round] = {}
        self._closed: OrderedDict[str, Round] = OrderedDict()
        self._retention = retention

    def open_rounds(self) -> list[Round]:
        return list(self._open.values())

    def closed_round(self, tag: str) -> Round | None:
        return self._closed.get(tag)

    def open_round(
        self,
        tag: str,
        op: str,
        live_group: Iterable[str],
        timeout_s: float,
        on_deadline: Callable[[Round], None],
    ) -> Round:
        """The open round `tag`, created (with its deadline) on first use."""
        rnd = self._open.get(tag)
        if rnd is None:
            rnd = Round(tag, op, set(live_group))
            loop = asyncio.get_running_loop()
            rnd.deadline = loop.call_later(timeout_s, on_deadline, rnd)
            self._open[tag] = rnd
        return rnd

    def close(
        self, rnd: Round, result: dict[str, torch.Tensor], included: tuple[str, ...], duration_s: float
    ) -> None:
        """Publish the result to every waiting contributor and retire the round."""
        rnd.closed, rnd.result, rnd.included, rnd.duration_s = True, result, included, duration_s
        rnd.contributions.clear()  # drop the references to the contributors' tensors
        self.discard(rnd)
        self._closed[rnd.tag] = rnd
        while len(self._closed) > self._retention:
            self._closed.popitem(last=False)
        for fut in rnd.waiters.values():
            if not fut.done():
                fut.set_result(None)

    def discard(self, rnd: Round) -> None:
        if rnd.deadline is not None:
            rnd.deadline.cancel()
        if self._open.get(rnd.tag) is rnd:
            del self._open[rnd.tag]


def reduce_contributions(
    contributions: Mapping[str, Mapping[str, torch.Tensor]], order: tuple[str, ...], op: str
) -> dict[str, torch.Tensor]:
    """Sum (or mean) of the contributions of `order`, accumulated in that order.

    Floating tensors accumulate in float64 and are cast back to their dtype; integer tensors
    accumulate in int64 ("sum" only).
    """
    first = contributions[order[0]]
    if len(order) == 1:  # the mean or sum of one contribution is itself: copy, skip float64
        return {name: t.detach().clone() for name, t in first.items()}
    out: dict[str, torch.Tensor] = {}
    for name, ref in first.items():
        acc_dtype = torch.float64 if ref.is_floating_point() else torch.int64
        acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
        for peer in order:
            acc += contributions[peer][name].to(acc.device)  # promotes on the fly, no temporary
        if op == "mean":
            acc /= len(order)
        out[name] = acc.to(ref.dtype)
    return out
