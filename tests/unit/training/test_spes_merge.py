"""SPES expert-merging warm-up (ALGORITHMS.md §1, oracles 4 and 5): the pure merge and its schedule."""

import pytest
import torch

from hyphae.training import ModelConfig, build_model
from hyphae.training._experts import merge_coefficient, merge_experts, merge_model_experts_


def _experts(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"w1": torch.randn(6, 4, generator=gen), "w2": torch.randn(4, 6, generator=gen)} for _ in range(n)]


def test_merge_with_a_zero_is_the_identity() -> None:
    experts = _experts(6)
    merged = merge_experts(experts, 0.0, top_k=4)
    assert all(torch.equal(m[k], e[k]) for m, e in zip(merged, experts) for k in e)


def test_merge_result_does_not_depend_on_expert_processing_order() -> None:
    experts = _experts(6)
    merged = merge_experts(experts, 0.3, top_k=4)
    perm = [4, 0, 5, 2, 1, 3]
    merged_perm = merge_experts([experts[i] for i in perm], 0.3, top_k=4)
    for pos, i in enumerate(perm):
        assert all(torch.equal(merged_perm[pos][k], merged[i][k]) for k in ("w1", "w2"))


def test_merge_with_a_one_and_top_k_all_others_gives_each_expert_the_mean_of_the_others() -> None:
    experts = _experts(5)
    merged = merge_experts(experts, 1.0, top_k=4)
    for e in range(5):
        for k in ("w1", "w2"):
            others = torch.stack([experts[d][k] for d in range(5) if d != e]).mean(dim=0)
            torch.testing.assert_close(merged[e][k], others, rtol=0, atol=1e-6)


def test_merge_pulls_each_expert_towards_its_most_similar_w1_only() -> None:
    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(3))
    far = -base  # cosine -1 to the others
    experts = [{"w1": base + 0.01 * i, "w2": torch.full((4, 6), float(i))} for i in range(3)]
    experts.append({"w1": far, "w2": torch.full((4, 6), 100.0)})
    merged = merge_experts(experts, 0.5, top_k=2)
    assert torch.all(merged[0]["w2"] < 50)  # expert 3 is never among expert 0's top-2
    torch.testing.assert_close(merged[0]["w2"], torch.full((4, 6), 0.5 * 1.5))


def test_merge_strength_follows_the_linear_schedule_and_is_zero_from_T_on() -> None:
    a0, until = 0.05, 20000
    assert merge_coefficient(0, a0=a0, until=until) == a0
    assert merge_coefficient(10000, a0=a0, until=until) == pytest.approx(a0 / 2)
    values = [merge_coefficient(t, a0=a0, until=until) for t in range(0, until, 500)]
    assert all(x > y for x, y in zip(values, values[1:]))
    assert all(merge_coefficient(t, a0=a0, until=until) == 0.0 for t in (until, until + 1, 2 * until, 10**9))


def test_model_merge_acts_per_layer_in_place(micro_config: ModelConfig) -> None:
    model = build_model(micro_config.replace(n_experts=4, top_k=2), seed=0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    merge_model_experts_(model, 1.0, top_k=3)
    for layer in range(2):
        for e in range(4):
            got = model.expert_parameters(layer, e)[f"blocks.{layer}.mlp.experts.{e}.w2"]
            others = torch.stack([before[f"blocks.{layer}.mlp.experts.{d}.w2"] for d in range(4) if d != e]).mean(0)
            torch.testing.assert_close(got.detach(), others, rtol=0, atol=1e-6)
    assert torch.equal(model.wte.weight, before["wte.weight"])  # shared tensors untouched


def test_merge_needs_two_experts() -> None:
    with pytest.raises(ValueError, match="at least two"):
        merge_experts(_experts(1), 0.1)
