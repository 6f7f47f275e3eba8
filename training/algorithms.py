"""The algorithm registry: build a `Strategy` from its name and a plain config dict.

This is what the daemon calls with the run state's `algorithm` and hyper-parameters, so a new
algorithm (NoLoCo, SPES, ZO, DADAO) becomes available everywhere by adding one entry here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hyphae.training.acid import ACiD2, ACiD2Config
from hyphae.training.comm import Comm
from hyphae.training.ddp import DDP, DDPConfig
from hyphae.training.diloco import DiLoCo, DiLoCoConfig
from hyphae.training.model import GPT
from hyphae.training.noloco import NoLoCo, NoLoCoConfig
from hyphae.training.spes import SPES, SPESConfig
from hyphae.training.strategy import Precision, Strategy
from hyphae.training.zo import ZO, ZOConfig

ALGORITHMS: dict[str, tuple[type[Strategy], type]] = {
    "ddp": (DDP, DDPConfig),
    "diloco": (DiLoCo, DiLoCoConfig),
    "noloco": (NoLoCo, NoLoCoConfig),
    "dadao": (ACiD2, ACiD2Config),  # the practical A²CiD² form; the exact DADAO is dadao.simulate
    "spes": (SPES, SPESConfig),
    "zo": (ZO, ZOConfig),
}
"""name -> (strategy class, its config class)."""


def build_strategy(
    algorithm: str,
    model: GPT,
    comm: Comm,
    config: Mapping[str, Any] | None = None,
    *,
    precision: Precision = "auto",
) -> Strategy:
    """The strategy named `algorithm` on this peer.

    Args:
        algorithm: a key of `ALGORITHMS` ("ddp", "diloco", "noloco", "dadao", "spes", "zo").
        model: this peer's replica.
        comm: this peer's Comm.
        config: the algorithm's config as a plain dict (nested dicts for nested configs);
            None or {} takes the defaults.
        precision: compute precision.

    Raises:
        ValueError: unknown algorithm, or a bad/unknown config key (the message names it).
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {sorted(ALGORITHMS)}")
    strategy_cls, config_cls = ALGORITHMS[algorithm]
    parsed = config_cls.from_dict(dict(config or {}))
    return strategy_cls(model, comm, parsed, precision=precision)  # type: ignore[call-arg]
