"""A joiner's choice of the run's weights (node/worker.py `_fetch_checked`): a claimed step above
the members' median is not believed, and weights that are not finite or do not fit the model
are refused (their author reported) in favour of the next record."""

from __future__ import annotations

import math

import torch

from hyphae.node.worker import RUN_CHECKPOINTS, _fetch_checked
from hyphae.training import ModelConfig, SimNetwork, build_model, run_virtual

MICRO = ModelConfig(vocab_size=256, context_length=16, n_layer=1, n_head=1, d_model=16)


def _publish(comm, weights, step: int) -> dict:
    async def go():
        digest = await comm.put_tensors(weights)
        record = {"step": step, "weights": digest, "algorithm": "diloco", "preset": "micro"}
        await comm.state_set(f"{RUN_CHECKPOINTS}{comm.peer_id}", record)
        return record

    return run_virtual(go())


def _choose(joiner, model):
    refused: list[tuple[str, str]] = []

    async def refuse(peer, reason):
        refused.append((peer, reason))

    joiner.refuse = refuse

    async def go():
        records = await joiner.state_items(RUN_CHECKPOINTS)
        usable = list(records.values())
        return await _fetch_checked(joiner, model, records, usable)

    record, weights = run_virtual(go())
    return record, weights, refused


def _weights(seed: int) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in build_model(MICRO, seed=seed).state_dict().items()}


def test_a_member_claiming_a_huge_step_is_not_believed_and_nan_weights_are_refused() -> None:
    net = SimNetwork()
    honest_a, honest_b, liar, poisoner, joiner = net.add_peers(5)
    _publish(honest_a, _weights(1), 100)
    _publish(honest_b, _weights(2), 110)
    _publish(liar, _weights(3), 10**9)  # claims to be far ahead of everyone
    nan = _weights(4)
    next(iter(nan.values()))[0] = math.nan
    _publish(poisoner, nan, 105)  # steps 100, 105, 110, 10^9: the median (low) is 105
    record, weights, refused = _choose(joiner, build_model(MICRO, seed=0))
    assert [peer for peer, _ in refused] == [poisoner.peer_id] and "NaN/Inf" in refused[0][1]
    assert record is not None and record["step"] == 100  # the newest believable, sane record
    assert all(torch.equal(weights[n], t) for n, t in _weights(1).items())  # honest_a's


def test_only_weights_that_fail_the_checks_leave_the_joiner_on_its_own_init() -> None:
    net = SimNetwork()
    poisoner, wrong, joiner = net.add_peers(3)
    nan = _weights(4)
    next(iter(nan.values()))[0] = math.inf
    _publish(poisoner, nan, 50)
    _publish(wrong, {"not.a.param": torch.zeros(3)}, 50)
    record, weights, refused = _choose(joiner, build_model(MICRO, seed=0))
    assert record is None and weights == {}
    reasons = dict(refused)
    assert len(refused) == 2 and set(reasons) == {poisoner.peer_id, wrong.peer_id}
    assert "NaN/Inf" in reasons[poisoner.peer_id] and "shapes differ" in reasons[wrong.peer_id]
