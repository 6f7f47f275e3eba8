"""What the daemon's training worker runs: the ``[training]`` table of the config file."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hyphae.protocol.errors import ConfigError

__all__ = ["TrainConfig", "ALGORITHMS"]

ALGORITHMS = ("ddp", "diloco")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Training settings; every field can also be given as ``--<field>`` on ``hyphae node join``."""

    preset: str = "tiny"
    """Model preset (see ``hyphae.training`` presets)."""
    algorithm: str = "diloco"
    """How peers combine their work: one of ALGORITHMS."""
    max_steps: int = 0
    """Stop cleanly after this many local steps (0 = run until stopped)."""
    data: Path | None = None
    """A text file/directory or .bin shards; None = the Python standard library's sources."""
    seed: int = 0
    """Base seed; each peer derives its own data stream from it."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 (0 = no limit), got {self.max_steps}")

    @classmethod
    def from_dict(cls, table: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
        values = dict(table)
        if values.get("data") is not None:
            values["data"] = Path(str(values["data"])).expanduser()
        for name, kind in (("preset", str), ("algorithm", str), ("max_steps", int), ("seed", int)):
            if name in values and (not isinstance(values[name], kind) or isinstance(values[name], bool)):
                raise ConfigError(f"training.{name} must be {kind.__name__}, got {values[name]!r}")
        return cls(**values)
