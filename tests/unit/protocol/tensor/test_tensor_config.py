"""TensorConfig's per-peer unclaimed budget: a quarter of the node's by default, never above it."""

from __future__ import annotations

import pytest

from hyphae.protocol.errors import ConfigError
from hyphae.protocol.tensor import TensorConfig


def test_the_per_peer_unclaimed_budget_defaults_to_a_quarter_of_the_nodes() -> None:
    assert TensorConfig().max_unclaimed_bytes_per_peer == 512 << 20
    assert TensorConfig(max_unclaimed_bytes=4 << 20).max_unclaimed_bytes_per_peer == 1 << 20


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_unclaimed_bytes": 100, "max_unclaimed_bytes_per_peer": 101}, "must be <= max_unclaimed_bytes"),
    ({"max_unclaimed_bytes_per_peer": 0}, "max_unclaimed_bytes_per_peer must be an int >= 1"),
    ({"max_unclaimed_bytes_per_peer": 1.5}, "max_unclaimed_bytes_per_peer must be an int >= 1"),
])
def test_a_bad_per_peer_budget_says_what_to_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TensorConfig(**kwargs)
