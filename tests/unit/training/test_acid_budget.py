"""A²CiD²'s byte budget: the gossip interval follows from it, and peers send about that many bytes."""

from __future__ import annotations

import asyncio

import pytest

from hyphae.training import ModelConfig, SimNetwork, build_model, run_virtual
from hyphae.training.acid import ACiD2, ACiD2Config, gossip_interval


def _sent_per_peer_per_s(micro_config: ModelConfig, bytes_per_s: float, seconds: float = 1500.0) -> tuple[float, ACiD2]:
    """Gossip alone (no training) on 4 peers for `seconds`; mean bytes sent per peer per second."""
    net = SimNetwork(latency_s=0.01)
    cfg = ACiD2Config(bytes_per_s=bytes_per_s, timeout_s=5.0, run_id="budget")
    strategies = [ACiD2(build_model(micro_config, seed=0), c, cfg) for c in net.add_peers(4)]

    async def main():
        async with asyncio.TaskGroup() as tasks:
            for s in strategies:
                await s.start(tasks)
            await asyncio.sleep(seconds)
            for s in strategies:
                await s.aclose()

    run_virtual(main())
    sent = sum(net.traffic(p).sent_bytes for p in net.members()) / 4
    return sent / seconds, strategies[0]


def test_the_budget_sets_the_gossip_interval() -> None:
    assert gossip_interval(ACiD2Config(gossip_interval_s=3.0), 4000) == 3.0  # no budget: the config's
    assert gossip_interval(ACiD2Config(gossip_interval_s=3.0, bytes_per_s=1000.0), 4000) == 4.0
    with pytest.raises(ValueError, match="use bytes_per_s <= "):
        gossip_interval(ACiD2Config(bytes_per_s=1e12), 4000)
    with pytest.raises(ValueError, match="bytes_per_s must be >= 0"):
        ACiD2Config(bytes_per_s=-1.0)


def test_peers_send_about_their_budget(micro_config: ModelConfig) -> None:
    budget = 13376.0  # the micro model's 133760 bytes every 10 s
    rate, strategy = _sent_per_peer_per_s(micro_config, budget)
    assert strategy.gossip_interval_s == pytest.approx(strategy.gossip_bytes / budget) == pytest.approx(10.0)
    assert 0.7 * budget < rate < 1.3 * budget  # ~150 gossips per peer: Poisson noise ~8 %
    half, _ = _sent_per_peer_per_s(micro_config, budget / 2)
    assert 0.3 * rate < half < 0.7 * rate
