"""Joining a run in progress from the members' outer state (training/_join.py), in the simulator."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import numpy as np
import pytest
import torch

from hyphae.training import (
    ACiD2,
    ACiD2Config,
    AdamWConfig,
    BatchStream,
    DiLoCo,
    DiLoCoConfig,
    LoopConfig,
    ModelConfig,
    NoLoCo,
    NoLoCoConfig,
    SimNetwork,
    build_model,
    run_virtual,
    train,
)
from hyphae.training._join import OUTER_PREFIX, WANT_PREFIX, JoinDesk, layout_of
from hyphae.training.loop import Callback

INNER = AdamWConfig(lr=3e-3, warmup_steps=2, weight_decay=0.1, grad_clip=1.0)
TOKENS = np.random.default_rng(1).integers(0, 256, 50_000).astype(np.uint8)
H = 3


def _stream(i: int | str) -> BatchStream:
    return BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=i)


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().cpu().numpy().tobytes())
    return h.hexdigest()


class Outer(Callback):
    """Digest of (φ, outer momentum) after every outer step, per peer."""

    def __init__(self, strategy, seen: dict[int, dict[str, str]]) -> None:
        self.strategy, self.seen = strategy, seen

    async def on_step(self, step: int) -> None:
        if step % H == 0:
            self.seen.setdefault(step, {})[self.strategy.comm.peer_id] = _digest(self.strategy.outer_state())


def _run_with_joiner(micro_config: ModelConfig, make, *, join_after: int, total: int):
    """Three members train `total` steps; at step `join_after` a fourth peer joins (its model
    from another seed, so only what it fetched can make it agree)."""
    net = SimNetwork(latency_s=0.01)
    members = [make(build_model(micro_config, seed=0), c) for c in net.add_peers(3)]
    seen: dict[int, dict[str, str]] = {}
    out: dict[str, object] = {}

    async def joiner() -> None:
        comm = net.add_peer("joiner")
        strategy = make(build_model(micro_config, seed=7), comm)
        start = await strategy.catch_up()
        out["start"], out["strategy"], out["loaded"] = start, strategy, _digest(strategy.outer_state())
        await train(strategy, _stream("joiner"), LoopConfig(max_steps=total), start_step=start,
                    callbacks=[Outer(strategy, seen)])

    class Spawn(Callback):
        async def on_step(self, step: int) -> None:
            if step == join_after:
                out["task"] = asyncio.ensure_future(joiner())

    async def run_all() -> None:
        await asyncio.gather(*(
            train(s, _stream(i), LoopConfig(max_steps=total),
                  callbacks=[Outer(s, seen), *([Spawn()] if i == 0 else [])])
            for i, s in enumerate(members)))
        await out["task"]

    run_virtual(run_all())
    return members, out, seen


@pytest.mark.parametrize("overlap", [0, 1])
def test_a_diloco_joiner_matches_the_members_phi_and_momentum_after_its_first_outer_step(
        micro_config: ModelConfig, overlap: int) -> None:
    cfg = DiLoCoConfig(inner=INNER, inner_steps=H, timeout_s=5.0, overlap_steps=overlap)
    members, out, seen = _run_with_joiner(micro_config, lambda m, c: DiLoCo(m, c, cfg), join_after=2 * H,
                                          total=8 * H)
    start = out["start"]  # with overlap, the step at which the members applied that outer step
    assert isinstance(start, int) and (start - overlap) % H == 0 and start >= 2 * H
    start -= overlap
    joiner = out["strategy"]
    later = [s for s in sorted(seen) if s > start]
    assert len(later) >= 3
    for step in later:  # from its first outer step on, the same (φ, momentum) bits as everyone
        assert len(set(seen[step].values())) == 1 and len(seen[step]) == 4, (step, seen[step])
    # What it loaded is what the members held from that outer step on (with overlap, a member
    # records the step's φ at the next multiple of H: it was applied τ steps after this one).
    assert out["loaded"] == seen[start + (H if overlap else 0)][members[0].comm.peer_id]
    assert _digest(joiner.slow) == _digest(members[0].slow)
    assert joiner.outer_steps == members[0].outer_steps == 8


def test_a_noloco_joiner_starts_as_a_copy_of_a_source_and_trains_with_the_run(micro_config: ModelConfig) -> None:
    cfg = NoLoCoConfig(inner=INNER, inner_steps=H, timeout_s=5.0, run_id="join-test")
    members, out, seen = _run_with_joiner(micro_config, lambda m, c: NoLoCo(m, c, cfg), join_after=2 * H,
                                          total=8 * H)
    start, joiner = out["start"], out["strategy"]
    assert isinstance(start, int) and start % H == 0 and start >= 2 * H
    # The joiner loaded one member's (φ, δ) of that boundary: what that member held then.
    assert out["loaded"] in {d for p, d in seen[start].items() if p != "joiner"}
    assert joiner.outer_steps == 8 and members[0].outer_steps == 8
    assert joiner.local_only_steps < joiner.outer_steps - start // H  # it was paired with members


def test_an_acid_joiner_takes_x_and_x_tilde_of_a_member(micro_config: ModelConfig) -> None:
    net = SimNetwork(latency_s=0.01)
    cfg = ACiD2Config(optimizer=INNER, gossip_interval_s=1.0, timeout_s=2.0, run_id="join-test")
    comms = net.add_peers(2)
    members = [ACiD2(build_model(micro_config, seed=0), c, cfg) for c in comms]

    class Pace(Callback):  # a step takes 0.1 s of run time
        def __init__(self, comm) -> None:
            self.comm = comm

        async def on_step(self, step: int) -> None:
            await self.comm.sleep(0.1)

    async def run_all():
        tasks = [asyncio.ensure_future(train(s, _stream(i), LoopConfig(max_steps=60), callbacks=[Pace(s.comm)]))
                 for i, s in enumerate(members)]
        await comms[0].sleep(2.5)
        comm = net.add_peer("joiner")
        joiner = ACiD2(build_model(micro_config, seed=7), comm, cfg)
        start = await joiner.catch_up()
        loaded = {n: p.detach().clone() for n, p in joiner.model.named_parameters()}
        await asyncio.gather(*tasks)
        return start, joiner, loaded

    start, joiner, loaded = run_virtual(run_all())
    assert isinstance(start, int) and start % 10 == 0 and start >= 20
    fresh = build_model(micro_config, seed=7)
    assert any(not torch.equal(loaded[n], p) for n, p in fresh.named_parameters())
    assert all(torch.isfinite(t).all() for t in joiner.x_tilde.values())


def test_a_fresh_run_has_nothing_to_join(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    a, b = (DiLoCo(build_model(micro_config, seed=0), c, DiLoCoConfig(inner=INNER, inner_steps=H))
            for c in net.add_peers(2))
    assert run_virtual(b.catch_up()) is None
    assert run_virtual(a.comm.state_items(WANT_PREFIX)) == {}


def _member_records(net: SimNetwork, strategy: DiLoCo, steps: dict[str, int]) -> dict:
    """Members at these steps, as their step records say (they put no state); their comms."""
    comms = {}
    for peer, step in steps.items():
        comms[peer] = net.add_peer(peer)
        run_virtual(_record(comms[peer], strategy, step))
    return comms


async def _record(comm, strategy: DiLoCo, step: int) -> None:
    await comm.state_set(f"{OUTER_PREFIX}{comm.peer_id}",
                         {"algorithm": "diloco", "layout": strategy.joins.layout, "step": step})


async def _later(comm, seconds: float, *records: tuple) -> None:
    """After `seconds`, write these (comm, record) step records."""
    await comm.sleep(seconds)
    for who, record in records:
        await who.state_set(f"{OUTER_PREFIX}{who.peer_id}", record)


def _state_record(strategy: DiLoCo, step: int, digest: str | None = None) -> dict:
    record = {"algorithm": "diloco", "layout": strategy.joins.layout, "step": step}
    return record if digest is None else {**record, "state": digest, "state_step": step}


def test_a_state_above_the_members_median_step_is_not_believed(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    cfg = DiLoCoConfig(inner=INNER, inner_steps=H)
    joiner = DiLoCo(build_model(micro_config, seed=7), net.add_peer("joiner"), cfg)
    members = _member_records(net, joiner, {"a": 4, "b": 4})
    liar = net.add_peer("liar")
    source = DiLoCo(build_model(micro_config, seed=0), members["a"], cfg)
    lie = run_virtual(liar.put_tensors(source.outer_state()))
    run_virtual(liar.state_set(f"{OUTER_PREFIX}liar", _state_record(joiner, 10**9, lie)))
    honest = run_virtual(members["a"].put_tensors({k: t + 1 for k, t in source.outer_state().items()}))

    async def go():
        served = _later(members["a"], 2.0, (members["a"], _state_record(joiner, 5, honest)),
                        (members["b"], _state_record(joiner, 5)))
        return (await asyncio.gather(joiner.catch_up(), served))[0]

    assert run_virtual(go()) == 5 * H  # the honest state of step 5, not the liar's "step 10^9"
    assert joiner.outer_steps == 5
    assert all(torch.equal(joiner.slow[n], t + 1) for n, t in source.slow.items())


def test_a_state_of_another_model_is_refused_and_nothing_loads(micro_config: ModelConfig, caplog) -> None:
    net = SimNetwork()
    cfg = DiLoCoConfig(inner=INNER, inner_steps=H)
    joiner = DiLoCo(build_model(micro_config, seed=0), net.add_peer("joiner"), cfg)
    before = _digest(joiner.slow)
    members = _member_records(net, joiner, {"a": 4, "bad": 4})
    wrong = run_virtual(members["bad"].put_tensors({k: torch.zeros(3) for k in joiner.outer_state()}))
    joiner.joins.wait_s = 5.0

    async def go():
        served = _later(members["a"], 1.0, (members["bad"], _state_record(joiner, 5, wrong)),
                        (members["a"], _state_record(joiner, 5)))
        return (await asyncio.gather(joiner.catch_up(), served))[0]

    with caplog.at_level(logging.WARNING, logger="hyphae.training._join"):
        assert run_virtual(go()) is None
    assert "refusing outer state" in caplog.text and "from bad" in caplog.text
    assert _digest(joiner.slow) == before and joiner.outer_steps == 0


def test_a_joiner_gives_up_when_members_pass_boundaries_without_serving(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    cfg = DiLoCoConfig(inner=INNER, inner_steps=H)
    joiner = DiLoCo(build_model(micro_config, seed=0), net.add_peer("joiner"), cfg)
    members = _member_records(net, joiner, {"a": 2, "b": 2})

    async def members_move_on() -> None:  # two boundaries later, and nobody put a state
        await members["a"].sleep(1.0)
        for comm in members.values():
            await _record(comm, joiner, 4)

    async def both():
        result = (await asyncio.gather(joiner.catch_up(), members_move_on()))[0]
        return result, joiner.comm.now()

    result, gave_up_at = run_virtual(both())
    assert result is None
    assert gave_up_at < 60  # on seeing the boundaries pass, not after wait_s (2 h)
    assert run_virtual(joiner.comm.state_items(WANT_PREFIX)) == {}  # the request was withdrawn


def test_only_the_first_sources_put_the_state_and_only_once_per_request(micro_config: ModelConfig) -> None:
    net = SimNetwork()
    cfg = DiLoCoConfig(inner=INNER, inner_steps=H)
    comms = net.add_peers(5)
    strategies = [DiLoCo(build_model(micro_config, seed=0), c, cfg) for c in comms]
    asker = comms[-1]
    layout = layout_of(strategies[0]._params)
    run_virtual(asker.state_set(f"{WANT_PREFIX}{asker.peer_id}", {"algorithm": "diloco", "layout": layout, "after": 0}))
    for s in strategies[:-1]:
        run_virtual(s.joins.boundary(1))
        run_virtual(s.joins.boundary(2))
    assert [s.joins.served for s in strategies[:-1]] == [1, 1, 1, 0]
    records = run_virtual(asker.state_items(OUTER_PREFIX))
    assert len({r["state"] for r in records.values() if "state" in r}) == 1  # one content address
    run_virtual(asker.state_set(f"{WANT_PREFIX}{asker.peer_id}", None))
    run_virtual(strategies[0].joins.boundary(3))
    assert "state" not in run_virtual(asker.state_get(f"{OUTER_PREFIX}{comms[0].peer_id}"))


def test_step_records_are_written_every_record_every_boundaries_while_nobody_asks(
        micro_config: ModelConfig) -> None:
    net = SimNetwork()
    comm = net.add_peer()
    strategy = DiLoCo(build_model(micro_config, seed=0), comm, DiLoCoConfig(inner=INNER, inner_steps=H))
    desk = JoinDesk(comm, strategy, layout="x", record_every=3)
    written = []
    for b in range(1, 8):
        run_virtual(desk.boundary(b))
        written.append(run_virtual(comm.state_get(f"{OUTER_PREFIX}{comm.peer_id}"))["step"])
    assert written == [1, 1, 3, 3, 3, 6, 6]  # the first, then every 3rd


def _spes_run(micro_config: ModelConfig):
    from hyphae.training import SPES, SPESConfig

    cfg = micro_config.replace(n_experts=4, top_k=2)
    spes = SPESConfig(optimizer=INNER, sync_steps=4, merge_interval=0)
    net = SimNetwork(latency_s=0.01)
    nodes = [SPES(build_model(cfg, seed=0), c, spes) for c in net.add_peers(2)]

    async def run():
        await asyncio.gather(*(train(s, _stream(i), LoopConfig(max_steps=8)) for i, s in enumerate(nodes)))

    run_virtual(run())
    return net, nodes, cfg, spes


def test_a_spes_joiner_starts_at_the_synced_weights_step_so_its_rounds_carry_the_members_numbers(
        micro_config: ModelConfig) -> None:
    from hyphae.training import SPES

    net, nodes, cfg, spes = _spes_run(micro_config)
    joiner = SPES(build_model(cfg, seed=9), net.add_peer("joiner"), spes)
    assert run_virtual(joiner.catch_up()) == 8  # the members' last sync, not step 0
    assert all(torch.equal(p, dict(nodes[0].model.named_parameters())[n])
               for n, p in joiner.model.named_parameters())


def test_a_spes_record_claiming_a_step_above_the_experts_is_not_believed(micro_config: ModelConfig) -> None:
    from hyphae.training import SPES
    from hyphae.training.spes import SHARED_KEY

    net, nodes, cfg, spes = _spes_run(micro_config)
    record = run_virtual(nodes[0].comm.state_get(SHARED_KEY))
    run_virtual(nodes[1].comm.state_set(SHARED_KEY, {**record, "step": 10**9}))
    joiner = SPES(build_model(cfg, seed=9), net.add_peer("joiner"), spes)
    assert run_virtual(joiner.catch_up()) is None
