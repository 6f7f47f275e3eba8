"""Gradient accumulation: micro-batches summed with 1/n make the same update as one big batch."""

import torch

from hyphae.training import DDP, AdamWConfig, DDPConfig, LoopConfig, ModelConfig, SimNetwork, build_model, run_virtual, train


class _Fixed:
    """A batch source that hands out slices of one fixed token block, in order."""

    def __init__(self, tokens: torch.Tensor, batch_size: int) -> None:
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, tokens.shape[1] - 1
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.tokens.shape[0]
        start = (self.position * self.batch_size) % rows
        block = self.tokens[start : start + self.batch_size]
        self.position += 1
        return block[:, :-1], block[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}


def _train(config: ModelConfig, tokens: torch.Tensor, *, batch_size: int, accum: int, steps: int) -> dict:
    strategy = DDP(build_model(config, seed=0), SimNetwork().add_peer(),
                   DDPConfig(optimizer=AdamWConfig(lr=1e-2, warmup_steps=0)))
    loop = LoopConfig(max_steps=steps, grad_accum_steps=accum, log_every=steps)
    result = run_virtual(train(strategy, _Fixed(tokens, batch_size), loop))
    assert result.tokens == steps * batch_size * accum * tokens.shape[1] - steps * batch_size * accum
    return {n: p.detach().clone() for n, p in strategy.model.named_parameters()}


def test_accumulating_4_micro_batches_of_2_equals_one_batch_of_8(micro_config: ModelConfig) -> None:
    tokens = torch.randint(0, micro_config.vocab_size, (8, micro_config.context_length + 1),
                           generator=torch.Generator().manual_seed(5))
    big = _train(micro_config, tokens, batch_size=8, accum=1, steps=3)
    accumulated = _train(micro_config, tokens, batch_size=2, accum=4, steps=3)
    moved = max((big[n] - p).abs().max().item() for n, p in
                build_model(micro_config, seed=0).named_parameters())
    assert moved > 1e-3  # the three steps changed the weights, so equality below means something
    for name, weight in big.items():
        torch.testing.assert_close(accumulated[name], weight, rtol=1e-5, atol=1e-5, msg=name)  # Adam amplifies fp32 rounding of ~0 grads


def test_accumulation_differs_from_taking_only_the_last_micro_batch(micro_config: ModelConfig) -> None:
    """The oracle above could pass vacuously if accumulation dropped micro-batches; it does not."""
    tokens = torch.randint(0, micro_config.vocab_size, (8, micro_config.context_length + 1),
                           generator=torch.Generator().manual_seed(6))
    accumulated = _train(micro_config, tokens, batch_size=2, accum=4, steps=1)
    last_only = _train(micro_config, tokens[6:8].repeat(4, 1), batch_size=2, accum=4, steps=1)
    assert any((accumulated[n] - last_only[n]).abs().max() > 1e-6 for n in accumulated)
