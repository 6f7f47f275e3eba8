"""The default way DiLoCo, DDP and SPES combine what members send: a checked all-gather.

A plain mean (what `Comm.all_reduce` computes) lets one member's NaN, or one vector scaled up a
thousandfold, poison every member for good. So by default each member swaps its tensors with
every other member (`Comm.exchange`, one tag per round) and, before combining:

1. refuses a contribution of the wrong layout or holding NaN/±Inf, counts it, and tells its
   node (`Comm.refuse`), which lowers the sender's score;
2. scales any vector whose L2 norm exceeds `norm_clip` × the median norm of the round's members
   down to that cap (clipping, not dropping, keeps an honest outlier's direction);
3. combines the rows in sorted peer order by the mean, median or trimmed mean
   (`robust.aggregate`, float64, one rounding), so members that gathered the same rows get the
   same bits.

This peer's own row goes through the same checks (a local NaN is not spread either). Cost: N − 1
transfers of the tensors each way per member and round, against about 2 for the ring
all-reduce; `norm_clip = 0` with `robust = "none"` switches an algorithm back to the
all-reduce, whose result is still checked to be finite (a poisoned round is then skipped, but
nobody can say who poisoned it).

DDP and SPES (whose rounds rely on the all-reduce's rule that a member arriving late still gets
the round's result: a gather has no such rule, so a node a round behind would wait out every
round) use `reduce_verified` instead: the ring all-reduce first, and only if its result is not
finite — every member holds the same bits, so every member decides the same — the round is
redone as the checked gather, which names and refuses the poisoner. A finite but scaled
contribution is not clipped on that path; `robust` = "median" / "trimmed_mean" gathers every
round (clipped too).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from hyphae.training import robust
from hyphae.training.comm import Comm, CommClosed, CommError

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


def checks_on(method: str, norm_clip: float) -> bool:
    """True if these options ask for the checked gather (the default) rather than the all-reduce."""
    return method != "none" or norm_clip > 0


@dataclass(frozen=True, slots=True)
class Gathered:
    """Outcome of one checked gather round."""

    tensors: Tensors | None
    """The combined tensors (the inputs' dtypes and devices); None if no row passed the checks."""
    included: tuple[str, ...]
    """Peers whose rows are in `tensors`, sorted."""
    refused: dict[str, str]
    """Peer -> why its row was refused (this round)."""
    clipped: tuple[str, ...] = ()
    """Peers whose rows were scaled down to the norm cap."""


async def gather_checked(comm: Comm, tensors: Mapping[str, torch.Tensor], *, group: list[str], tag: str,
                         timeout_s: float, method: str = "none", trim_fraction: float = 0.25,
                         norm_clip: float = 3.0) -> Gathered:
    """Swap `tensors` with every other member of `group`, check every row, and combine.

    A member that does not answer within `timeout_s` (gone, or not in this round) is left out
    like a refused one, but not reported: silence is not proof of malice.

    Raises:
        CommClosed: this peer's Comm closed (the round is abandoned).
    """
    me = comm.peer_id
    own = {n: t.detach() for n, t in tensors.items()}
    try:
        async with asyncio.TaskGroup() as tasks:  # _swap turns every expected failure into None
            swaps = {p: tasks.create_task(_swap(comm, p, own, tag, timeout_s)) for p in group if p != me}
    except* CommClosed as errors:  # this peer left: say so plainly, not as a group
        raise errors.exceptions[0] from None
    rows: dict[str, Tensors] = {}
    refused: dict[str, str] = {}
    for peer, row in [(me, dict(own)), *((p, t.result()) for p, t in swaps.items())]:
        if row is None:
            continue
        why = _check(row, own)
        if why:
            refused[peer] = why
        else:
            rows[peer] = row
    for peer, why in refused.items():
        logger.warning("%s: refused the contribution of %s (%s)", tag, "this peer" if peer == me else peer, why)
        if peer != me:
            await comm.refuse(peer, f"{tag}: {why}")
    if not rows:
        return Gathered(None, (), refused)
    clipped: list[str] = []
    if norm_clip > 0:
        norms = {p: robust.global_norm(r) for p, r in rows.items()}
        cap = norm_clip * statistics.median(norms.values())
        for p, n in norms.items():
            if n > cap:
                rows[p] = robust.scaled(rows[p], cap / n)
                clipped.append(p)
        if clipped:
            logger.info("%s: clipped the contributions of %s to %.3g (%g x the median norm)", tag,
                        ", ".join(sorted(clipped)), cap, norm_clip)
    order = sorted(rows)
    combined = robust.aggregate([{n: rows[p][n].to(own[n].device) for n in own} for p in order], method,
                                trim_fraction)
    out = {n: combined[n].to(own[n].dtype) for n in own}
    return Gathered(out, tuple(order), refused, tuple(sorted(clipped)))


async def reduce_verified(comm: Comm, tensors: Mapping[str, torch.Tensor], *, group: list[str], tag: str,
                          timeout_s: float, method: str = "none", trim_fraction: float = 0.25,
                          norm_clip: float = 3.0) -> Gathered:
    """The ring all-reduce's mean, redone as :func:`gather_checked` if it is not finite.

    Raises:
        CommClosed: this peer's Comm closed.
        CommError, TimeoutError: the all-reduce failed (the caller's fallback applies).
    """
    if method != "none":
        return await gather_checked(comm, tensors, group=group, tag=tag, timeout_s=timeout_s, method=method,
                                    trim_fraction=trim_fraction, norm_clip=norm_clip)
    result = await comm.all_reduce(tensors, group=group, tag=tag, timeout_s=timeout_s)
    if robust.is_finite(result.tensors):
        return Gathered(result.tensors, tuple(result.included), {})
    logger.warning("%s: the all-reduced mean holds NaN/Inf; redoing the round as a checked gather to find "
                   "who sent them", tag)
    return await gather_checked(comm, tensors, group=group, tag=f"{tag}/checked", timeout_s=timeout_s,
                                method=method, trim_fraction=trim_fraction, norm_clip=norm_clip)


def _check(row: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor]) -> str:
    """Why `row` cannot be combined with `own` ("" if it can)."""
    if set(row) != set(own) or any(tuple(row[n].shape) != tuple(t.shape) for n, t in own.items()):
        return "wrong tensors"
    if not all(row[n].is_floating_point() for n in own):
        return "non-float tensors"
    if not robust.is_finite(row):
        return "non-finite values"
    return ""


async def _swap(comm: Comm, peer: str, own: Tensors, tag: str, timeout_s: float) -> Tensors | None:
    try:
        return await comm.exchange(peer, own, tag=tag, timeout_s=timeout_s)
    except CommClosed:
        raise
    except (CommError, TimeoutError) as exc:
        logger.info("%s: %s unavailable (%s); without it", tag, peer, exc)
        return None


MAX_REMEMBERED = 32


def remember_refused(known: list[str], new: Iterable[str]) -> list[str]:
    """The peers refused so far (sorted, at most MAX_REMEMBERED), for the dashboard."""
    merged = sorted(set(known) | set(new))
    return merged[:MAX_REMEMBERED]


def result_is_finite(tensors: Mapping[str, torch.Tensor], what: str) -> bool:
    """For the unchecked all-reduce path: False (and a warning) if the reduced result is poisoned."""
    if robust.is_finite(tensors):
        return True
    logger.warning("%s: the all-reduced result holds NaN/Inf (some member sent them); round skipped. "
                   "Leave norm_clip on (the default) to refuse such contributions and name the sender", what)
    return False
