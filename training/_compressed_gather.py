"""The checked all-gather of compressed (SparseLoCo) contributions: swap, decode, check, clip, sum.

Each member keeps different coordinates, so the contributions cannot go through the all-reduce.
Like `_robust_gather.gather_checked`, every member swaps its payload with every other member
(`Comm.exchange`, one tag per round) and, before combining:

1. decodes each payload against its own layout (`compression.decode`: names, dtypes, sizes,
   offsets in range and strictly increasing, codes on the grid, finite scales): a payload that
   fails is refused, counted and reported to the node (`Comm.refuse`), which lowers the
   sender's score; decoded values are finite by construction, so no NaN can pass;
2. scales any contribution whose norm exceeds `norm_clip` × the round's median norm down to
   that cap (issue 23's protection, on the values actually sent);
3. adds the (index, value) sets up in sorted peer order in float64 and divides once
   (`compression.accumulate`), or, with `robust` = "median" / "trimmed_mean", combines them
   densely coordinate by coordinate (a coordinate a member did not send counts as its 0).

This peer's own payload goes through the same decoder and is combined as sent (not as its exact
Δ), so members that gathered the same rows hold the same bits. Bytes: N − 1 payloads each way
per member and round, ~1 % of the fp32 Δ each at density 1 %.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
from dataclasses import dataclass

import torch

from hyphae.kernels import Sparse, sparse_values
from hyphae.training import robust
from hyphae.training.comm import Comm, CommClosed, CommError
from hyphae.training.compression import CompressedPayloadError, Compressor, accumulate, decode, encode, sparse_norm

logger = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True, slots=True)
class GatheredSparse:
    """Outcome of one compressed gather round."""

    flat: torch.Tensor | None
    """The combined contribution, flat fp32 on the compressor's device; None if no row passed."""
    included: tuple[str, ...]
    """Peers whose rows are in `flat`, sorted."""
    refused: dict[str, str]
    """Peer -> why its row was refused (this round)."""
    clipped: tuple[str, ...] = ()
    """Peers whose rows were scaled down to the norm cap."""


async def gather_sparse(comm: Comm, compressor: Compressor, own: Sparse, *, group: list[str], tag: str,
                        timeout_s: float, method: str = "none", trim_fraction: float = 0.25,
                        norm_clip: float = 3.0, average: str = "members") -> GatheredSparse:
    """Swap `own` with every other member of `group`, check every row, and combine.

    A member that does not answer within `timeout_s` is left out, not reported.

    Raises:
        CommClosed: this peer's Comm closed (the round is abandoned).
    """
    me, payload = comm.peer_id, encode(own)
    try:
        async with asyncio.TaskGroup() as tasks:  # _swap turns every expected failure into None
            swaps = {p: tasks.create_task(_swap(comm, p, payload, tag, timeout_s)) for p in group if p != me}
    except* CommClosed as errors:  # this peer left: say so plainly, not as a group
        raise errors.exceptions[0] from None
    rows: dict[str, Sparse] = {}
    refused: dict[str, str] = {}
    device = compressor.error.device
    for peer, got in [(me, payload), *((p, t.result()) for p, t in swaps.items())]:
        if got is None:
            continue
        try:
            rows[peer] = decode(got, compressor.layout, device=device)
        except CompressedPayloadError as exc:
            refused[peer] = str(exc)
    for peer, why in refused.items():
        logger.warning("%s: refused the compressed contribution of %s (%s)", tag,
                       "this peer" if peer == me else peer, why)
        if peer != me:
            await comm.refuse(peer, f"{tag}: {why}")
    if not rows:
        return GatheredSparse(None, (), refused)
    factors, clipped = _clip_factors(rows, norm_clip)
    if clipped:
        logger.info("%s: clipped the contributions of %s to %g x the median norm", tag, ", ".join(clipped), norm_clip)
    order = sorted(rows)
    if method == "none":
        sets = []
        for p in order:
            index, values = sparse_values(rows[p])
            sets.append((index, values.mul_(factors[p])))
        flat = accumulate(sets, compressor.layout.numel, average=average, device=device)
    else:
        dense = [{"flat": compressor.dense(rows[p], scale=factors[p])} for p in order]
        flat = robust.aggregate(dense, method, trim_fraction)["flat"]
    return GatheredSparse(flat, tuple(order), refused, clipped)


def _clip_factors(rows: dict[str, Sparse], norm_clip: float) -> tuple[dict[str, float], tuple[str, ...]]:
    """Per peer the factor that brings its norm down to norm_clip × the median (1 if within)."""
    factors = dict.fromkeys(rows, 1.0)
    if norm_clip <= 0:
        return factors, ()
    norms = {p: sparse_norm(r) for p, r in rows.items()}
    cap = norm_clip * statistics.median(norms.values())
    clipped = []
    for p, n in norms.items():
        if n > cap:
            factors[p] = cap / n
            clipped.append(p)
    return factors, tuple(sorted(clipped))


async def _swap(comm: Comm, peer: str, payload: Tensors, tag: str, timeout_s: float) -> Tensors | None:
    try:
        return await comm.exchange(peer, payload, tag=tag, timeout_s=timeout_s)
    except CommClosed:
        raise
    except (CommError, TimeoutError) as exc:
        logger.info("%s: %s unavailable (%s); without it", tag, peer, exc)
        return None
