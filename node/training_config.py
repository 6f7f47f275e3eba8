"""What the daemon's training worker runs: the ``[training]`` table of the config file.

This module must not import torch (the CLI loads it for every command); the algorithm names are
checked against ``hyphae.training.algorithms.ALGORITHMS`` by a unit test instead.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyphae.protocol.errors import ConfigError

__all__ = ["TrainConfig", "ALGORITHMS", "GROUP_UNSUPPORTED", "parse_gpus"]

ALGORITHMS = ("ddp", "diloco", "noloco", "dadao", "spes", "zo")


GROUP_UNSUPPORTED = {
    "dadao": "its gossip runs on its own timer, so the workers would drift apart",
    "zo": "its steps have no gradients for the workers to average",
}
"""Algorithms a node's local workers cannot run in lockstep (hyphae.training.local_group), and why."""


def parse_gpus(text: str) -> tuple[int, ...] | None:
    """The GPU indices of ``training.gpus``: () for "", None for "all", else the listed ones.

    Raises:
        ConfigError: not "", "all" or a comma-separated list of distinct indices >= 0.
    """
    if not isinstance(text, str):
        raise ConfigError(f"training.gpus must be a string such as \"all\" or \"0,1\", got {text!r}")
    text = text.strip()
    if text in ("", "all"):
        return () if not text else None
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() for p in parts) or len(set(map(int, parts))) != len(parts):
        raise ConfigError(f"training.gpus must be \"all\" or distinct GPU indices like \"0,1\", got {text!r}")
    return tuple(int(p) for p in parts)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training settings; most can also be given as ``--<field>`` on ``hyphae node join``."""

    preset: str = "tiny"
    """Model preset (``hyphae.training.PRESETS``: tiny, small, medium, large, and *-moe)."""
    algorithm: str = "diloco"
    """How peers combine their work: one of ALGORITHMS."""
    algorithm_config: dict[str, Any] = field(default_factory=dict)
    """The algorithm's hyper-parameters (e.g. ``{inner_steps = 100}`` for DiLoCo); unknown keys
    are errors, reported when the worker builds the algorithm."""
    max_steps: int = 0
    """Stop cleanly after this many local steps (0 = run until stopped); the node then leaves."""
    data: Path | None = None
    """A text file/directory or .bin shards; None = the Python standard library's sources."""
    seed: int = 0
    """Base seed (model init is shared by all peers; each peer's data stream derives from its id)."""
    batch_size: int = 8
    """Sequences per step."""
    seq_len: int = 128
    """Tokens per sequence (capped at the model's context length)."""
    log_every: int = 10
    """Steps between progress reports."""
    eval_every: int = 100
    """Steps between validation-loss measurements (0 = never)."""
    checkpoint_every: int = 100
    """Steps between checkpoints (0 = only when stopping)."""
    threads: int = 0
    """Torch CPU threads for the worker (0 = torch's default, one per core). Set 1 when several
    nodes share a machine (testnets): oversubscribed OpenMP threads run 5-10x slower."""
    workers: int = 1
    """Training workers on this node. They average their gradients among themselves every step
    and take part in the run as one member: N workers of ``batch_size`` B train like one worker
    on N x B. Without ``gpus`` they are CPU workers (``threads`` torch threads each); with
    ``gpus`` there is one per GPU, and this must be left at 1 or equal the number of GPUs."""
    gpus: str = ""
    """The GPUs to train on, one worker each: "all" (every visible one) or indices like "0,1".
    Empty: one worker on GPU 0 where there is one, else on the CPU (or ``workers`` CPU workers)."""
    init_from: str = ""
    """Start a fresh node from these weights instead of a seeded init: a checkpoint directory
    (e.g. another run's DATA_DIR/checkpoints), or "run" for the newest checkpoint the run's
    members announce. Empty: a node with no checkpoint of its own joins a run in progress by
    taking the newest weights its members announce (DDP, DiLoCo, NoLoCo, DADAO), or starts
    from the seeded init when the run is new."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 (0 = no limit), got {self.max_steps}")
        for name in ("batch_size", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"training.{name} must be >= 0 (0 = never), got {getattr(self, name)}")
        self._check_workers()
        if not isinstance(self.algorithm_config, dict):
            raise ConfigError(f"training.algorithm_config must be a table, got {self.algorithm_config!r}")

    def _check_workers(self) -> None:
        if not isinstance(self.workers, int) or isinstance(self.workers, bool) or self.workers < 1:
            raise ConfigError(f"training.workers must be an integer >= 1, got {self.workers!r}")
        gpus = parse_gpus(self.gpus)
        if gpus and self.workers not in (1, len(gpus)):
            raise ConfigError(f"training.workers is {self.workers} but training.gpus lists {len(gpus)} GPUs "
                              f"({self.gpus}); there is one worker per GPU: leave workers at 1 or set {len(gpus)}")
        count = len(gpus) if gpus else self.workers  # "all" (None): the daemon counts and checks again
        if count > 1 and self.algorithm in GROUP_UNSUPPORTED:
            raise ConfigError(f"algorithm {self.algorithm!r} cannot run on several workers of one node "
                              f"({GROUP_UNSUPPORTED[self.algorithm]}); use --workers 1 and one GPU, or another "
                              "algorithm")

    @classmethod
    def from_dict(cls, table: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
        values = dict(table)
        if values.get("data") is not None:
            values["data"] = Path(str(values["data"])).expanduser()
        ints = ("max_steps", "seed", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every", "threads",
                "workers")
        for name in ("preset", "algorithm", "init_from", "gpus", *ints):
            kind = str if name in ("preset", "algorithm", "init_from", "gpus") else int
            if name in values and (not isinstance(values[name], kind) or isinstance(values[name], bool)):
                raise ConfigError(f"training.{name} must be {kind.__name__}, got {values[name]!r}")
        return cls(**values)
