"""Which share of the data each member reads: one table in the run state, kept by the lowest member.

Record ``data/shards`` = {"data": <data id>, "members": [sorted peer ids], "version": n}. Member
i of the list reads shard (i, len(list)) — a slice of the window starts of a ``BatchStream``
corpus (the built-in one, text read as bytes, ``.bin`` shards) or every len-th record of a text
stream — so under one table no two members read the same window, and together they cover the
data. The lowest live member (sorted peer ids) rewrites the table whenever the live members
differ from it: a member that went has its share spread over the others, a joiner gets a place.
Every member follows the table when it lists it, and its own view of the live members until the
table does (a joiner before the keeper saw it), and re-reads it every few steps
(:class:`ShardKeeper`), so a change reaches everyone within those steps plus the time the run
state takes to spread: in between, two members may read a few overlapping windows.

The key is shared (any member may write it, the newest write wins); readers take only a
well-formed table (a sorted list of distinct peer ids) for their own data.
"""

from __future__ import annotations

import logging
from typing import Any

from hyphae.training import Callback, Comm
from hyphae.training.comm import CommClosed, CommError

__all__ = ["SHARDS_KEY", "ShardKeeper", "member_shard", "read_table"]

log = logging.getLogger(__name__)

SHARDS_KEY = "data/shards"
MAX_MEMBERS = 4096


def read_table(value: Any, data: str) -> list[str] | None:
    """The members of a well-formed shard table for `data` (None for anything else)."""
    if not isinstance(value, dict) or value.get("data") != data:
        return None
    members = value.get("members")
    if (not isinstance(members, list) or not 0 < len(members) <= MAX_MEMBERS
            or not all(isinstance(p, str) and p for p in members) or members != sorted(set(members))):
        return None
    return members


async def member_shard(comm: Comm, data: str) -> tuple[int, int]:
    """This member's (k, n) for `data`; the lowest live member first brings the table up to date.

    Raises:
        CommClosed: this peer left. Other network failures (CommError) propagate too; the caller
            keeps its current shard.
    """
    me = comm.peer_id
    live = sorted(set(await comm.members()) | {me})
    current = await comm.state_get(SHARDS_KEY)
    table = read_table(current, data)
    if live[0] == me and table != live:
        version = current.get("version") if isinstance(current, dict) else 0
        version = version + 1 if isinstance(version, int) and not isinstance(version, bool) else 1
        await comm.state_set(SHARDS_KEY, {"data": data, "members": live, "version": version})
        log.info("data shards reassigned over %d members (table version %d)", len(live), version)
        table = live
    members = table if table is not None and me in table else live
    return members.index(me), len(members)


class ShardKeeper(Callback):
    """Follows the shard table during training: every `every` steps, reshard `batches` if this
    member's share changed (``BatchStream.reshard``; the position is kept).

    Args:
        comm: the strategy's Comm (in a node's group, every rank sees rank 0's answers).
        batches: the stream to reshard.
        data: the data id the table is for.
        every: steps between two reads of the table.
        local_rank, local_world: this worker's place in its node (shard k·world + rank of n·world).
    """

    def __init__(self, comm: Comm, batches: Any, data: str, *, every: int, local_rank: int = 0,
                 local_world: int = 1) -> None:
        self.comm, self.batches, self.data, self.every = comm, batches, data, max(1, every)
        self.local_rank, self.local_world = local_rank, max(1, local_world)
        self.reshards = 0

    async def on_step(self, step: int) -> None:
        if step % self.every:
            return
        try:
            k, n = await member_shard(self.comm, self.data)
        except CommClosed:
            raise
        except CommError as exc:
            log.debug("shard table unavailable (%s); keeping shard %s", exc, self.batches.shard)
            return
        shard = (k * self.local_world + self.local_rank, n * self.local_world)
        if shard != self.batches.shard:
            try:
                self.batches.reshard(shard)
            except ValueError as exc:  # more members than windows: keep reading what it reads
                log.warning("step %d: cannot read data shard %d/%d (%s); keeping %s", step, *shard, exc,
                            self.batches.shard)
                return
            log.info("step %d: data shard %s -> %d/%d", step, self.batches.shard, *shard)
            self.reshards += 1
