"""The run's data shard table (node/data_shards.py): disjoint shares, reassigned as members come and go."""

from __future__ import annotations

import numpy as np

from hyphae.node.data_shards import SHARDS_KEY, ShardKeeper, member_shard, read_table
from hyphae.training import BatchStream, SimNetwork, run_virtual

DATA = "stdlib"
TOKENS = np.arange(20_000, dtype=np.uint16)


def _shards(comms) -> dict[str, tuple[int, int]]:
    return {c.peer_id: run_virtual(member_shard(c, DATA)) for c in comms}


def test_members_read_disjoint_shares_that_cover_the_data() -> None:
    comms = SimNetwork().add_peers(3)
    shards = _shards(reversed(comms))  # the keeper need not be the first to ask
    assert sorted(shards.values()) == [(0, 3), (1, 3), (2, 3)]
    assert read_table(run_virtual(comms[0].state_get(SHARDS_KEY)), DATA) == sorted(c.peer_id for c in comms)


def test_a_member_that_goes_has_its_share_spread_and_a_joiner_gets_one() -> None:
    net = SimNetwork()
    comms = net.add_peers(3)
    _shards(comms)
    net.kill(comms[1].peer_id)
    live = [comms[0], comms[2]]
    assert sorted(_shards(live).values()) == [(0, 2), (1, 2)]
    joiner = net.add_peer("zz-joiner")
    assert run_virtual(member_shard(joiner, DATA)) == (2, 3)  # its own view until the keeper writes
    assert sorted(_shards([*live, joiner]).values()) == [(0, 3), (1, 3), (2, 3)]
    assert run_virtual(comms[0].state_get(SHARDS_KEY))["version"] == 3


def test_a_malformed_or_other_datas_table_is_not_followed() -> None:
    net = SimNetwork()
    comms = net.add_peers(2)
    for bad in ({"data": DATA, "members": [comms[1].peer_id, comms[1].peer_id]},
                {"data": DATA, "members": [comms[1].peer_id, comms[0].peer_id]},  # not sorted
                {"data": "other", "members": [comms[1].peer_id]}, "garbage"):
        run_virtual(comms[1].state_set(SHARDS_KEY, bad))
        assert run_virtual(member_shard(comms[1], DATA)) == (1, 2)  # its own view of the members


def test_the_keeper_reshards_a_stream_when_the_table_changes_and_windows_stay_disjoint() -> None:
    net = SimNetwork()
    comms = net.add_peers(3)
    streams = [BatchStream([TOKENS], batch_size=8, seq_len=16, seed=0, stream=c.peer_id) for c in comms]
    keepers = [ShardKeeper(c, s, DATA, every=5) for c, s in zip(comms, streams)]
    for k in keepers:
        run_virtual(k.on_step(5))
    starts = [{int(x[0]) for i in range(40) for x in s.batch_at(i)[0]} for s in streams]
    assert all(not (a & b) for i, a in enumerate(starts) for b in starts[i + 1:])
    assert [s.shard for s in streams] == [(0, 3), (1, 3), (2, 3)]
    net.kill(comms[2].peer_id)
    run_virtual(keepers[1].on_step(7))  # not a multiple of `every`: nothing read
    assert streams[1].shard == (1, 3)
    for k in keepers[:2]:
        run_virtual(k.on_step(10))
    assert [s.shard for s in streams[:2]] == [(0, 2), (1, 2)] and keepers[0].reshards == 2
    assert streams[0].position == 0  # the position is kept
