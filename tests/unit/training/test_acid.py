"""A²CiD²: closed-form mixing, conserving gossip, a training loop that never waits, config."""

import asyncio
import math

import time

import numpy as np
import pytest
import torch

from hyphae.training import (
    BatchStream,
    Callback,
    LoopConfig,
    ModelConfig,
    SimComm,
    SimNetwork,
    build_model,
    build_strategy,
    run_virtual,
    train,
)
from hyphae.training.acid import ACiD2, ACiD2Config, acid_constants, gossip_, mix_, tick_times
from hyphae.training.optim import AdamWConfig

OPT = AdamWConfig(lr=3e-3, warmup_steps=2)
TOKENS = np.random.default_rng(1).integers(0, 256, 50_000).astype(np.uint8)


def _stream(i: int | str) -> BatchStream:
    return BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=i)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten().float() for t in tensors])


class Pace(Callback):
    """A step lasts `step_time_s` virtual seconds; records the time spent inside `step`."""

    def __init__(self, comm: SimComm, step_time_s: float = 1.0) -> None:
        self.comm, self.step_time_s = comm, step_time_s
        self.resumed_at = 0.0
        self.waits: list[float] = []

    async def on_step(self, step: int) -> None:
        self.waits.append(self.comm.now() - self.resumed_at)
        await self.comm.sleep(self.step_time_s)
        self.resumed_at = self.comm.now()


def _gossip_only(strategies: list[ACiD2], seconds: float) -> None:
    """Run the strategies' gossip (no training) for `seconds` of virtual time."""
    async def main():
        async with asyncio.TaskGroup() as tasks:
            for s in strategies:
                await s.start(tasks)
            await asyncio.sleep(seconds)
            for s in strategies:
                await s.aclose()

    run_virtual(main())


# --- oracle 6: the pure operations -----------------------------------------------------------


def test_mixing_preserves_x_plus_x_tilde_and_shrinks_the_gap_exponentially() -> None:
    gen = torch.Generator().manual_seed(0)
    x, xt = torch.randn(1000, generator=gen, dtype=torch.float64), torch.randn(1000, generator=gen, dtype=torch.float64)
    total, gap = x + xt, x - xt
    mix_(x, xt, 0.3)
    torch.testing.assert_close(x + xt, total, rtol=0, atol=1e-12)
    torch.testing.assert_close(x - xt, gap * math.exp(-2 * 0.3), rtol=0, atol=1e-12)


def test_mixing_composes_over_time_and_is_identity_over_zero_time() -> None:
    x, xt = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    a, at = x.clone(), xt.clone()
    mix_(a, at, 0.2)
    mix_(a, at, 0.5)
    b, bt = x.clone(), xt.clone()
    mix_(b, bt, 0.7)
    torch.testing.assert_close((a, at), (b, bt), rtol=0, atol=1e-12)
    c, ct = x.clone(), xt.clone()
    mix_(c, ct, 0.0)
    assert torch.equal(c, x) and torch.equal(ct, xt)


def test_gossip_preserves_the_sum_of_x_over_the_pair_and_moves_x_tilde_by_alpha_tilde() -> None:
    xi, xj = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    ti, tj = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    si, sj = xi.clone(), xj.clone()  # what each sent
    total, ti0, tj0 = xi + xj, ti.clone(), tj.clone()
    gossip_(xi, ti, si, sj, 0.5)
    gossip_(xj, tj, sj, si, 0.5)
    torch.testing.assert_close(xi + xj, total, rtol=0, atol=1e-12)
    torch.testing.assert_close(xi, (si + sj) / 2, rtol=0, atol=1e-12)  # x_i ← (x_i + x_j)/2
    torch.testing.assert_close(ti - ti0, 0.5 * (sj - si), rtol=0, atol=1e-12)
    torch.testing.assert_close(tj - tj0, 0.5 * (si - sj), rtol=0, atol=1e-12)


def test_gossip_conserves_the_sum_even_if_x_moved_while_the_bytes_were_in_flight() -> None:
    xi, xj = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    si, sj = xi.clone(), xj.clone()
    xi += 0.1  # a gradient step landed meanwhile
    total = xi + xj
    gossip_(xi, torch.zeros(50, dtype=torch.float64), si, sj, 0.5)
    gossip_(xj, torch.zeros(50, dtype=torch.float64), sj, si, 0.5)
    torch.testing.assert_close(xi + xj, total, rtol=0, atol=1e-12)


def test_complete_graph_constants() -> None:
    eta, alpha_tilde = acid_constants(*(1 / (8 * 0.25),) * 2)  # n = 8, edge rate 0.25
    assert alpha_tilde == pytest.approx(0.5) and eta == pytest.approx(8 * 0.25 / 2)


def test_gossip_clock_is_a_shared_poisson_process() -> None:
    ticks = [t for _, t in zip(range(4000), tick_times("run", 2.0))]
    again = [t for _, t in zip(range(4000), tick_times("run", 2.0))]
    assert ticks == again  # every peer draws the same ticks
    gaps = np.diff([0.0] + [t for _, t in ticks])
    assert np.all(gaps > 0)
    assert gaps.mean() == pytest.approx(2.0, rel=0.05)
    assert gaps.std() == pytest.approx(2.0, rel=0.08)  # exponential: std = mean
    other = [t for _, (_, t) in zip(range(10), tick_times("other run", 2.0))]
    assert other != [t for _, t in ticks[:10]]
    assert len({k for k, _ in ticks}) == len(ticks)  # tick keys name ticks uniquely


def test_a_peer_joins_the_gossip_clock_at_wall_time_without_replaying_it() -> None:
    now = 1.8e9  # wall-clock seconds, as the daemon's run clock reads
    start = time.perf_counter()
    late = [kt for _, kt in zip(range(50), tick_times("run", 0.5, start_s=now))]
    assert time.perf_counter() - start < 0.5
    early = [kt for _, kt in zip(range(200), tick_times("run", 0.5, start_s=now - 30))]
    assert set(late) <= set(early) or late[0][1] >= early[-1][1]  # the same ticks, whoever looks
    assert late[0][1] >= (now // 60) * 60


# --- the strategy ----------------------------------------------------------------------------


def test_gossip_alone_conserves_the_sum_and_reaches_consensus(micro_config: ModelConfig) -> None:
    n = 6
    net = SimNetwork(latency_s=0.01)
    cfg = ACiD2Config(optimizer=OPT, gossip_interval_s=1.0, timeout_s=0.5)
    strategies = [ACiD2(build_model(micro_config, seed=i), c, cfg) for i, c in enumerate(net.add_peers(n))]

    def spread() -> float:
        rows = torch.stack([_flat(s.model.parameters()) for s in strategies]).double()
        return float(((rows - rows.mean(0)) ** 2).sum(1).mean())

    total0 = torch.stack([_flat(s.model.parameters()) for s in strategies]).double().sum(0)
    spread0 = spread()

    _gossip_only(strategies, 40.0)
    total = torch.stack([_flat(s.model.parameters()) for s in strategies]).double().sum(0)
    assert (total - total0).abs().max().item() < 1e-5
    assert spread() < spread0 / 100
    assert all(s.gossips >= 20 and s.failed_gossips == 0 for s in strategies)
    assert sum(s.gossips for s in strategies) % 2 == 0  # every gossip has two ends


@pytest.mark.parametrize("max_in_flight", [1, 3])
def test_a_silent_member_costs_only_its_own_gossips(micro_config: ModelConfig, max_in_flight: int) -> None:
    # A member that never answers (crashed, not yet marked gone) makes its partner wait timeout_s
    # = 6 ticks. Attending only one gossip at a time, that partner misses those ticks, so *their*
    # partners time out too: seen with 4 daemons, gossip stalled run-wide (~10 of 200 ticks
    # succeeded here). With gossips in flight side by side, it stays local.
    net = SimNetwork(latency_s=0.01)
    comms = net.add_peers(5)  # comms[4] is a member that never gossips
    cfg = ACiD2Config(optimizer=OPT, gossip_interval_s=1.0, timeout_s=6.0, max_in_flight=max_in_flight)
    strategies = [ACiD2(build_model(micro_config, seed=i), c, cfg) for i, c in enumerate(comms[:4])]

    _gossip_only(strategies, 200.0)
    done = [s.gossips for s in strategies]  # ~120 of 200 ticks pair a peer with a live one
    if max_in_flight == 1:
        assert max(done) < 30, done  # the stall, kept as the contrast
    else:
        assert min(done) >= 70, done
        assert strategies[0].last_failure.startswith("tick ")


def test_mixing_inside_the_strategy_preserves_x_plus_x_tilde(micro_config: ModelConfig) -> None:
    comms = SimNetwork().add_peers(2)
    s = ACiD2(build_model(micro_config, seed=0), comms[0], ACiD2Config(optimizer=OPT))
    with torch.no_grad():
        for t in s.x_tilde.values():
            t.add_(torch.randn_like(t))
    s._members = 2

    async def flow():
        before = _flat(s.model.parameters()) + _flat(s.x_tilde.values())
        s._flowed_at = s.comm.now()
        await asyncio.sleep(3.0)
        s._flow(s.comm.now())
        return before, _flat(s.model.parameters()) + _flat(s.x_tilde.values())

    before, after = run_virtual(flow())
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_training_loop_never_waits_even_with_a_silent_and_a_dead_peer(micro_config: ModelConfig) -> None:
    net = SimNetwork(latency_s=0.05)
    comms = net.add_peers(5)  # peer 3 is live but never trains; peer 4 dies at step 5
    cfg = ACiD2Config(optimizer=OPT, gossip_interval_s=1.0, timeout_s=2.0)
    workers = [0, 1, 2, 4]
    strategies = {i: ACiD2(build_model(micro_config, seed=0), comms[i], cfg) for i in workers}
    paces = {i: Pace(comms[i], 3.0 if i == 2 else 1.0) for i in workers}  # peer 2 is 3x slower

    class Die(Callback):
        async def on_step(self, step: int) -> None:
            if step == 5:
                await comms[4].aclose()

    async def main():
        return await asyncio.gather(*(
            train(strategies[i], _stream(i), LoopConfig(max_steps=20),
                  callbacks=[paces[i]] + ([Die()] if i == 4 else []))
            for i in workers
        ), return_exceptions=True)

    results = run_virtual(main())
    assert [r.steps for r in results[:3]] == [20, 20, 20]
    assert all(w == 0.0 for i in (0, 1, 2) for w in paces[i].waits)  # no barrier anywhere
    assert paces[0].resumed_at == pytest.approx(20.0) and paces[2].resumed_at == pytest.approx(60.0)
    assert all(strategies[i].failed_gossips > 0 for i in (0, 1))  # the silent/dead peers were skipped
    assert all(strategies[i].gossips > 0 for i in (0, 1, 2))
    assert strategies[0].step_time_s == pytest.approx(1.0) and strategies[2].step_time_s == pytest.approx(3.0)


def test_identical_data_and_init_stay_identical(micro_config: ModelConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    async def forbidden(*args, **kwargs):
        raise AssertionError("A²CiD² called all_reduce")

    monkeypatch.setattr(SimComm, "all_reduce", forbidden)
    comms = SimNetwork(latency_s=0.01).add_peers(4)
    cfg = ACiD2Config(optimizer=OPT, gossip_interval_s=0.5, timeout_s=0.4)
    strategies = [ACiD2(build_model(micro_config, seed=0), c, cfg) for c in comms]

    async def main():
        return await asyncio.gather(*(
            train(s, _stream("same"), LoopConfig(max_steps=10), callbacks=[Pace(c)])
            for s, c in zip(strategies, comms)
        ))

    run_virtual(main())
    assert all(s.gossips > 5 for s in strategies)
    first = _flat(strategies[0].model.parameters())
    assert all(torch.equal(_flat(s.model.parameters()), first) for s in strategies[1:])


def test_acid_is_built_by_the_registry_and_its_state_round_trips(micro_config: ModelConfig) -> None:
    comms = SimNetwork().add_peers(2)
    strategies = [build_strategy("dadao", build_model(micro_config, seed=0), c, {"gossip_interval_s": 0.5})
                  for c in comms]
    assert isinstance(strategies[0], ACiD2) and strategies[0].algorithm == "dadao"

    async def main():
        await asyncio.gather(*(train(s, _stream(i), LoopConfig(max_steps=4), callbacks=[Pace(c)])
                               for i, (s, c) in enumerate(zip(strategies, comms))))

    run_virtual(main())
    fresh = ACiD2(build_model(micro_config, seed=3), comms[0], ACiD2Config())
    fresh.load_state_dict(strategies[0].state_dict())
    assert torch.equal(_flat(fresh.x_tilde.values()), _flat(strategies[0].x_tilde.values()))
    assert fresh.gossips == strategies[0].gossips > 0 and fresh.step_time_s == 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [({"gossip_interval_s": 0}, "gossip_interval_s must be > 0"), ({"timeout_s": -1}, "timeout_s must be > 0"),
     ({"max_in_flight": 0}, "max_in_flight must be"),
     ({"eta": -0.1}, "eta must be >= 0"), ({"alpha_tilde": "x"}, "alpha_tilde must be a number")],
)
def test_acid_config_validation_names_the_field(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ACiD2Config(**changes)


def test_acid_config_round_trips_and_rejects_unknown_keys() -> None:
    cfg = ACiD2Config.from_dict({"optimizer": {"lr": 1e-3}, "eta": 0.0, "alpha_tilde": 0.0})
    assert ACiD2Config.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ACiD2Config key"):
        ACiD2Config.from_dict({"gossip_rate": 1.0})
