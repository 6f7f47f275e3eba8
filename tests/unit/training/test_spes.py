"""SPES oracles (ALGORITHMS.md §1): ownership and memory, sync, payload, churn, joiners."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from hyphae.training import (
    AdamWConfig,
    BatchStream,
    Callback,
    CommClosed,
    LoopConfig,
    ModelConfig,
    SimNetwork,
    build_adamw,
    build_model,
    build_strategy,
    run_virtual,
    train,
)
from hyphae.training._experts import assign_experts, expert_tensors, sync_bytes
from hyphae.training._tensor_codec import encode_tensors
from hyphae.training.spes import EXPERT_PREFIX, OWNER_PREFIX, SPES, SPESConfig, optimizer_state_bytes

TOKENS = np.random.default_rng(1).integers(0, 256, 50_000).astype(np.uint8)
OPT = AdamWConfig(lr=3e-3, warmup_steps=2)


def _cfg(micro_config: ModelConfig, experts: int = 4) -> ModelConfig:
    return micro_config.replace(n_experts=experts, top_k=2)


def _stream(i: int | str) -> BatchStream:
    return BatchStream([TOKENS], batch_size=4, seq_len=16, seed=0, stream=i)


class Probe(SPES):
    """SPES that remembers its weights right before and right after every sync."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pre: dict[int, dict[str, torch.Tensor]] = {}
        self.post: dict[int, dict[str, torch.Tensor]] = {}

    async def _sync(self, done: int):
        self.pre[done] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        metrics = await super()._sync(done)
        self.post[done] = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        return metrics


def _nodes(
    config: ModelConfig, n: int, spes: SPESConfig, net: SimNetwork | None = None
) -> tuple[SimNetwork, list[Probe]]:
    net = net or SimNetwork(latency_s=0.01)
    return net, [Probe(build_model(config, seed=0), c, spes) for c in net.add_peers(n)]


def _train_all(nodes: Sequence[SPES], steps: int, *, same_data: bool = False, callbacks=None, start_step: int = 0):
    async def main():
        loops = [
            train(s, _stream(0 if same_data else i), LoopConfig(max_steps=steps),
                  callbacks=(callbacks or {}).get(i, ()), start_step=start_step)
            for i, s in enumerate(nodes)
        ]
        return await asyncio.gather(*loops, return_exceptions=True)

    return run_virtual(main())


def _trainable_experts(node: SPES) -> set[tuple[int, int]]:
    cfg = node.model.config
    return {
        (layer, e)
        for layer in range(cfg.n_layer)
        for e in range(cfg.n_experts)
        if all(p.requires_grad for p in node.model.expert_parameters(layer, e).values())
    }


def _opt_params(node: SPES) -> set[int]:
    return {id(p) for g in node.optimizer.param_groups for p in g["params"]}


def test_each_node_trains_exactly_k_times_L_expert_slices_and_optimizer_state_only_for_those_and_shared(
    micro_config: ModelConfig,
) -> None:
    cfg = _cfg(micro_config, experts=8)
    net, nodes = _nodes(cfg, 4, SPESConfig(optimizer=OPT, sync_steps=100, merge_interval=0))
    _train_all(nodes, 2)
    k, layers = 2, cfg.n_layer
    owners = run_virtual(nodes[0].comm.state_items(OWNER_PREFIX))
    for p, node in enumerate(nodes):
        assert node.owned == (2 * p, 2 * p + 1)  # node p owns [p·k, (p+1)·k)
        trainable = _trainable_experts(node)
        assert len(trainable) == k * layers and {e for _, e in trainable} == set(node.owned)
        expected = {id(q) for q in node.model.shared_parameters().values()}
        for e in node.owned:
            expected |= {id(q) for q in expert_tensors(node.model, e).values()}
        assert _opt_params(node) == expected
        assert {id(q) for q in node.optimizer.state} == expected  # state after 2 steps: only those
        frozen = [q for e in range(8) if e not in node.owned for q in expert_tensors(node.model, e).values()]
        assert all(not q.requires_grad and q.grad is None for q in frozen)
        assert all(owners[f"{OWNER_PREFIX}{e}"] == node.comm.peer_id for e in node.owned)


def test_optimizer_memory_per_node_is_shared_plus_k_over_E_of_experts_measured(micro_config: ModelConfig) -> None:
    cfg = _cfg(micro_config, experts=8)
    _, nodes = _nodes(cfg, 4, SPESConfig(optimizer=OPT, sync_steps=100, merge_interval=0))
    _train_all(nodes, 1)
    full_model = build_model(cfg, seed=0)
    full = build_adamw(full_model.named_parameters(), OPT)
    x, y = _stream(0).next()
    full_model(x, y).loss.backward()
    full.step()
    measured_full = optimizer_state_bytes(full)
    shared = sum(p.numel() for p in full_model.shared_parameters().values())
    experts = full_model.num_parameters() - shared
    expected_fraction = (shared + experts * 2 / 8) / (shared + experts)
    for node in nodes:
        fraction = node.optimizer_state_bytes() / measured_full
        assert fraction == pytest.approx(expected_fraction, abs=0.005), (fraction, expected_fraction)
        assert fraction < 0.6


def test_after_a_static_sync_nodes_are_bit_identical_experts_are_owners_and_shared_is_fp32_mean(
    micro_config: ModelConfig,
) -> None:
    cfg = _cfg(micro_config, experts=4)
    net, nodes = _nodes(cfg, 4, SPESConfig(optimizer=OPT, sync_steps=3, merge_interval=0))
    _train_all(nodes, 3)
    shared_names = list(nodes[0].model.shared_parameters())
    order = sorted(range(4), key=lambda i: nodes[i].comm.peer_id)
    for name in shared_names:
        acc = torch.zeros_like(nodes[0].pre[3][name], dtype=torch.float64)
        for i in order:
            acc += nodes[i].pre[3][name]
        mean = (acc / 4).to(torch.float32)
        assert all(torch.equal(n.post[3][name], mean) for n in nodes), name
    for e in range(4):
        owner = next(n for n in nodes if e in n.owned)
        for name in expert_tensors(owner.model, e):
            assert all(torch.equal(n.post[3][name], owner.pre[3][name]) for n in nodes), name
    first = nodes[0].post[3]
    assert all(torch.equal(first[k], n.post[3][k]) for n in nodes[1:] for k in first)
    assert not torch.equal(nodes[0].pre[3]["wte.weight"], nodes[1].pre[3]["wte.weight"])  # they did differ


def test_identical_data_keeps_shared_tensors_identical_on_every_node(micro_config: ModelConfig) -> None:
    """Even before averaging: same weights + same batch => same shared gradient and update.

    Gradient clipping is off here: each node clips over its own trainable set (shared + its
    experts), so with clipping on the clip factor, and so the local shared update, differs
    per node (the sync then averages it away).
    """
    cfg = _cfg(micro_config, experts=4)
    opt = AdamWConfig(lr=3e-3, warmup_steps=2, grad_clip=0.0)
    _, nodes = _nodes(cfg, 2, SPESConfig(optimizer=opt, sync_steps=1, merge_interval=0))
    _train_all(nodes, 5, same_data=True)
    for done in range(1, 6):
        for name in nodes[0].model.shared_parameters():
            assert torch.equal(nodes[0].pre[done][name], nodes[1].pre[done][name]), (done, name)
            assert torch.equal(nodes[0].post[done][name], nodes[1].post[done][name])


def test_identical_data_and_sync_every_step_equals_one_process_training_everything_bit_for_bit(
    micro_config: ModelConfig,
) -> None:
    cfg = _cfg(micro_config, experts=4)
    opt = AdamWConfig(lr=3e-3, warmup_steps=2, grad_clip=0.0)  # SPES clips over its own subset only
    _, nodes = _nodes(cfg, 2, SPESConfig(optimizer=opt, sync_steps=1, merge_interval=0))
    _train_all(nodes, 4, same_data=True)
    ref = build_model(cfg, seed=0)
    optimizer = build_adamw(ref.named_parameters(), opt)
    stream = _stream(0)
    for step in range(4):
        for group in optimizer.param_groups:
            group["lr"] = opt.lr_at(step)
        x, y = stream.next()
        ref(x, y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    worst = max((p - q).abs().max().item() for p, q in zip(ref.parameters(), nodes[0].model.parameters()))
    assert worst == 0.0, worst


def test_sync_payload_matches_the_formula(micro_config: ModelConfig) -> None:
    cfg = _cfg(micro_config, experts=4)
    net, nodes = _nodes(cfg, 4, SPESConfig(optimizer=OPT, sync_steps=2, merge_interval=0))
    _train_all(nodes, 2)
    formula = sync_bytes(cfg, n_nodes=4, owned=1)
    model = nodes[0].model
    assert formula.shared_bytes == 4 * sum(p.numel() for p in model.shared_parameters().values())
    assert formula.expert_bytes == 4 * sum(p.numel() for p in expert_tensors(model, 0).values())
    blob = {e: len(encode_tensors({k: v.detach() for k, v in expert_tensors(model, e).items()})) for e in range(4)}
    assert all(blob[e] - formula.expert_bytes < 0.1 * formula.expert_bytes for e in blob)  # headers are small
    received = [n.comm.traffic().received_bytes for n in nodes]
    sent = [n.comm.traffic().sent_bytes for n in nodes]
    for node, got in zip(nodes, received):
        others = [e for e in range(4) if e not in node.owned]
        assert got == formula.allreduce_each_way + sum(blob[e] for e in others)
        assert formula.expert_download == 3 * formula.expert_bytes
    assert sum(sent) == sum(received)  # every blob byte someone fetched, someone (owner or relay) served
    assert formula.server_upload == formula.shared_bytes + formula.expert_bytes
    assert sync_bytes(cfg, n_nodes=4, owned=1, bytes_per_value=2).server_download * 2 == formula.server_download


def test_bf16_transfers_halve_the_sync_bytes_and_keep_nodes_bit_identical(micro_config: ModelConfig) -> None:
    cfg = _cfg(micro_config, experts=4)
    received = {}
    for dtype in ("float32", "bfloat16"):
        _, nodes = _nodes(cfg, 4, SPESConfig(optimizer=OPT, sync_steps=2, merge_interval=0, transfer_dtype=dtype))
        _train_all(nodes, 2)
        first = nodes[0].post[2]
        assert all(torch.equal(first[k], n.post[2][k]) for n in nodes[1:] for k in first)
        received[dtype] = sum(n.comm.traffic().received_bytes for n in nodes)
    assert received["bfloat16"] / received["float32"] == pytest.approx(0.5, abs=0.02)


def test_an_owner_leaving_mid_run_has_its_experts_adopted_without_losing_their_weights(
    micro_config: ModelConfig,
) -> None:
    cfg = _cfg(micro_config, experts=4)
    net, nodes = _nodes(cfg, 4, SPESConfig(optimizer=OPT, sync_steps=4, merge_interval=0, timeout_s=5.0))
    gone = nodes[1].comm.peer_id

    class Kill(Callback):
        async def on_step(self, step: int) -> None:
            if step == 6:
                net.kill(gone)

    results = _train_all(nodes, 12, callbacks={0: [Kill()]})
    assert isinstance(results[1], CommClosed)
    survivors = [n for i, n in enumerate(nodes) if i != 1]
    assert all(r.steps == 12 for i, r in enumerate(results) if i != 1)
    # Expert 1 was peer-0001's; its last blob is the sync-4 one.
    blob_after_4 = nodes[1].post[4]
    adopter = next(n for n in survivors if 1 in n.owned)
    assert adopter.owned == (0, 1) and adopter.comm.peer_id == "peer-0000"
    names = list(expert_tensors(adopter.model, 1))
    for n in survivors:
        assert all(torch.equal(n.post[8][k], blob_after_4[k]) for k in names)  # adopted, not re-initialised
    assert all(p.requires_grad for p in expert_tensors(adopter.model, 1).values())
    assert {id(p) for p in expert_tensors(adopter.model, 1).values()} <= _opt_params(adopter)
    assert any(not torch.equal(survivors[0].post[12][k], blob_after_4[k]) for k in names)  # trains on
    first = survivors[0].post[12]
    assert all(torch.equal(first[k], n.post[12][k]) for n in survivors[1:] for k in first)
    record = run_virtual(survivors[0].comm.state_get(f"{EXPERT_PREFIX}1"))
    assert record["peer"] == "peer-0000" and record["round"] == 3


def test_an_adopter_with_a_stale_copy_fetches_the_latest_blob_by_hash(micro_config: ModelConfig) -> None:
    cfg = _cfg(micro_config, experts=4)
    net, nodes = _nodes(cfg, 4, SPESConfig(optimizer=OPT, sync_steps=4, merge_interval=0, timeout_s=5.0))
    _train_all(nodes, 4)
    net.kill("peer-0001")
    adopter = nodes[0]
    with torch.no_grad():
        for p in expert_tensors(adopter.model, 1).values():
            p.add_(1.0)  # as if it had missed the last sync of expert 1
    adopter.loaded.pop(1)
    before = adopter.comm.traffic().received_bytes
    survivors = [nodes[0], nodes[2], nodes[3]]
    _train_all(survivors, 8, start_step=4)
    assert adopter.owned == (0, 1)
    names = list(expert_tensors(adopter.model, 1))
    assert all(torch.equal(adopter.post[8][k], nodes[1].post[4][k]) for k in names)
    blob = len(encode_tensors({k: nodes[1].post[4][k] for k in names}))
    assert adopter.comm.traffic().received_bytes - before >= blob


def test_a_node_joining_mid_run_starts_from_the_synced_weights_and_owns_experts_after_the_next_sync(
    micro_config: ModelConfig,
) -> None:
    cfg = _cfg(micro_config, experts=4)
    spes = SPESConfig(optimizer=OPT, sync_steps=4, merge_interval=0)
    net, nodes = _nodes(cfg, 2, spes)
    _train_all(nodes, 4)
    joiner = Probe(build_model(cfg, seed=123), net.add_peer(), spes)  # different init on purpose
    run_virtual(joiner._join())
    assert joiner.owned == ()
    synced = nodes[0].post[4]
    assert all(torch.equal(p, synced[n]) for n, p in joiner.model.named_parameters())
    everyone = [*nodes, joiner]
    _train_all(everyone, 8, start_step=4)
    assert [n.owned for n in everyone] == [(0, 1), (2,), (3,)]
    first = nodes[0].post[8]
    assert all(torch.equal(first[k], n.post[8][k]) for n in everyone[1:] for k in first)


def test_merge_warm_up_runs_on_schedule_and_keeps_nodes_identical(micro_config: ModelConfig) -> None:
    cfg = _cfg(micro_config, experts=4)
    spes = SPESConfig(optimizer=OPT, sync_steps=2, merge_interval=4, merge_a0=0.5, merge_until=6, merge_top_k=2)
    _, nodes = _nodes(cfg, 2, spes)
    _train_all(nodes, 8)
    assert all(n.merges == 1 for n in nodes)  # t = 4 (a = 0.5·(1 − 4/6)); t = 8 ≥ T: a = 0
    first = nodes[0].post[8]
    assert all(torch.equal(first[k], nodes[1].post[8][k]) for k in first)


def test_ownership_is_contiguous_blocks_of_the_sorted_members() -> None:
    assert assign_experts(["b", "a"], 4) == {0: "a", 1: "a", 2: "b", 3: "b"}
    assert assign_experts(["a", "b", "c"], 4) == {0: "a", 1: "a", 2: "b", 3: "c"}
    assert assign_experts(["a", "b", "c"], 2) == {0: "a", 1: "b"}
    with pytest.raises(ValueError, match="empty"):
        assign_experts([], 4)


def test_state_dict_round_trip_restores_ownership_and_optimizer(micro_config: ModelConfig, tmp_path) -> None:
    cfg = _cfg(micro_config, experts=4)
    _, nodes = _nodes(cfg, 2, SPESConfig(optimizer=OPT, sync_steps=2, merge_interval=0))
    _train_all(nodes, 3)
    path = tmp_path / "s.pt"
    torch.save(nodes[1].state_dict(), path)
    clone = SPES(nodes[1].model, SimNetwork().add_peer(), nodes[1].config)
    clone.load_state_dict(torch.load(path, weights_only=True))
    assert clone.owned == nodes[1].owned == (2, 3)
    assert optimizer_state_bytes(clone.optimizer) == optimizer_state_bytes(nodes[1].optimizer)


def test_spes_is_built_by_name_and_its_config_is_checked(micro_config: ModelConfig) -> None:
    comm = SimNetwork().add_peer()
    model = build_model(_cfg(micro_config), seed=0)
    strategy = build_strategy("spes", model, comm, {"sync_steps": 10, "merge_interval": 20})
    assert isinstance(strategy, SPES) and strategy.config.sync_steps == 10
    with pytest.raises(ValueError, match="multiple of sync_steps"):
        SPESConfig(sync_steps=100, merge_interval=250)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        SPES(build_model(micro_config, seed=0), comm)
    with pytest.raises(ValueError, match="unknown SPESConfig"):
        SPESConfig.from_dict({"sync_every": 3})
