"""Fixtures for the training tests: one torch thread (the machine is shared), small models."""

import pytest
import torch

from hyphae.training import ModelConfig

torch.set_num_threads(1)


@pytest.fixture
def micro_config() -> ModelConfig:
    """A model small enough that a step costs about a millisecond."""
    return ModelConfig(vocab_size=256, context_length=16, n_layer=2, n_head=2, d_model=32)


@pytest.fixture
def micro_moe_config(micro_config: ModelConfig) -> ModelConfig:
    return micro_config.replace(n_experts=4, top_k=2)
