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
PRECISIONS = ("auto", "fp32", "bf16")
_BASE_PRESETS = ("tiny", "small", "medium", "large", "llama-20m", "llama-125m", "llama-350m", "llama-1b")
PRESETS = tuple(name + suffix for name in _BASE_PRESETS for suffix in ("", "-moe"))
"""The model presets (``hyphae.training.PRESETS``; a unit test keeps the two in step)."""


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
    model: Path | None = None
    """A local Hugging Face model directory (``config.json`` + ``*.safetensors``, optionally
    ``tokenizer.json``) of a Llama / Qwen2 / Mistral-family model: its architecture replaces
    ``preset`` and a fresh node starts from its weights. Nothing is downloaded."""
    tokenizer: Path | None = None
    """A ``tokenizer.json`` (or a directory holding one) to tokenize ``data`` with; None takes the
    model directory's tokenizer when it has one, else bytes (vocabulary 256)."""
    text_field: str = "text"
    """The field of each ``.jsonl`` record / ``.parquet`` column that holds the text."""
    grad_accum: int = 1
    """Micro-batches of ``batch_size`` sequences accumulated per optimizer step."""
    precision: str = "auto"
    """"auto" (bf16 autocast on CUDA devices that have it, fp32 elsewhere), "bf16" or "fp32".
    Master weights and outer/pseudo-gradient state stay fp32 either way."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~30% more compute."""
    compile: bool = False
    """``torch.compile`` the model (faster steps on GPU after a warm-up of a minute or so)."""

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm must be one of {', '.join(ALGORITHMS)}, got {self.algorithm!r}")
        if self.preset not in PRESETS:
            raise ConfigError(f"training.preset must be one of {', '.join(PRESETS)}, got {self.preset!r} "
                              "(or give training.model = a Hugging Face model directory)")
        if self.max_steps < 0:
            raise ConfigError(f"max_steps must be >= 0 (0 = no limit), got {self.max_steps}")
        for name in ("batch_size", "seq_len", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"training.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "checkpoint_every", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"training.{name} must be >= 0 (0 = never), got {getattr(self, name)}")
        if self.grad_accum < 1:
            raise ConfigError(f"training.grad_accum must be >= 1 (1 = no accumulation), got {self.grad_accum}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"training.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ConfigError(f"training.text_field must be a non-empty string, got {self.text_field!r}")
        self._check_paths()
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

    def _check_paths(self) -> None:
        if self.model is not None:
            if not (self.model / "config.json").is_file():
                raise ConfigError(f"training.model {self.model} must be a directory holding config.json and "
                                  "*.safetensors (a Hugging Face model saved with save_pretrained)")
            if not any(self.model.glob("*.safetensors")):
                raise ConfigError(f"training.model {self.model} holds no *.safetensors file; save the model "
                                  "with safe_serialization=True (pickled .bin weights are not loaded)")
        if self.tokenizer is not None and not (self.tokenizer.is_file() or (self.tokenizer / "tokenizer.json").is_file()):
            raise ConfigError(f"training.tokenizer {self.tokenizer} must be a tokenizer.json file or a directory "
                              "holding one")

    @classmethod
    def from_dict(cls, table: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(table) - names)
        if unknown:
            raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
        values = dict(table)
        for name in ("data", "model", "tokenizer"):
            if values.get(name) is not None:
                if not isinstance(values[name], str | Path):
                    raise ConfigError(f"training.{name} must be a path, got {values[name]!r}")
                values[name] = Path(str(values[name])).expanduser()
        for name in ("activation_checkpointing", "compile"):
            if name in values and not isinstance(values[name], bool):
                raise ConfigError(f"training.{name} must be true or false, got {values[name]!r}")
        ints = ("max_steps", "seed", "batch_size", "seq_len", "log_every", "eval_every", "checkpoint_every", "threads",
                "grad_accum", "workers")
        strs = ("preset", "algorithm", "init_from", "text_field", "precision", "gpus")
        for name in (*strs, *ints):
            kind = str if name in strs else int
            if name in values and (not isinstance(values[name], kind) or isinstance(values[name], bool)):
                raise ConfigError(f"training.{name} must be {kind.__name__}, got {values[name]!r}")
        return cls(**values)
