"""`hyphae export --hf OUT`: a checkpoint of this node as a Hugging Face model directory.

The newest checkpoint of `DATA_DIR/checkpoints/` (or the one given) is written as
`config.json` + `model.safetensors` (+ `tokenizer.json` when given), which
`transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads with the same logits. The model
shape comes from the checkpoint's manifest, so nothing about the run has to be repeated here.
A Llama checkpoint (the `llama-*` presets, or a run started from a Hugging Face model) becomes
a "llama" (or "qwen2") model, a dense GPT a "gpt2" one; MoE checkpoints are refused (no exact
Hugging Face equivalent).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from hyphae.node.datadir import DataDir
from hyphae.protocol.errors import HyphaeError
from hyphae.training.checkpoint import Checkpoint, CheckpointError, CheckpointStore
from hyphae.training.hf import export_hf
from hyphae.training.model_config import ModelConfig

__all__ = ["ExportError", "ExportResult", "export_checkpoint_hf"]

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d+)$")


class ExportError(HyphaeError):
    """The checkpoint cannot be exported (none found, unreadable, or a model HF has no equivalent of)."""


@dataclass(frozen=True, kw_only=True)
class ExportResult:
    """What `export_checkpoint_hf` wrote.

    Attributes:
        path: the Hugging Face model directory.
        checkpoint: the checkpoint directory it came from.
        step: that checkpoint's training step.
        parameters: distinct parameters exported (a tied head counted once).
    """

    path: Path
    checkpoint: Path
    step: int
    parameters: int


def export_checkpoint_hf(
    out_dir: Path,
    *,
    data_dir: Path | None = None,
    checkpoint: Path | None = None,
    tokenizer_file: Path | None = None,
) -> ExportResult:
    """Export a checkpoint as a Hugging Face model directory.

    Args:
        out_dir: where config.json and model.safetensors go (created if missing).
        data_dir: the node's data dir; its `checkpoints/` newest checkpoint is exported.
        checkpoint: instead, a checkpoint directory (`.../step-00000100`) or a directory of
            them (its newest is exported).
        tokenizer_file: a tokenizer.json to copy along.

    Returns:
        What was written.

    Raises:
        ExportError: neither or both of data_dir/checkpoint, no loadable checkpoint, or a
            model Hugging Face has no exact equivalent for (MoE).
    """
    if (data_dir is None) == (checkpoint is None):
        raise ExportError("pass exactly one of a data dir or a checkpoint directory")
    if tokenizer_file is not None and not Path(tokenizer_file).is_file():
        raise ExportError(f"tokenizer file {tokenizer_file} does not exist")
    ckpt = _load(checkpoint if checkpoint is not None else DataDir(data_dir).root / "checkpoints")
    try:
        config = ModelConfig.from_dict(ckpt.manifest.model_config)
        path = export_hf(ckpt.weights, config, out_dir, tokenizer_file=tokenizer_file)
    except ValueError as exc:
        raise ExportError(f"cannot export {ckpt.path}: {exc}") from exc
    logger.info("exported %s to %s", ckpt.path, path)
    return ExportResult(path=path, checkpoint=ckpt.path, step=ckpt.manifest.step, parameters=config.num_parameters())


def _load(directory: Path) -> Checkpoint:
    """The checkpoint in `directory` (a step directory), or the newest of a store directory."""
    directory = Path(directory)
    try:
        if (directory / "manifest.json").is_file():
            m = _STEP_DIR.match(directory.name)
            if m is None:
                raise ExportError(f"{directory} has a manifest but is not named step-NNNNNNNN; pass its parent directory")
            return CheckpointStore(directory.parent).load(int(m.group(1)))
        store = CheckpointStore(directory)
        if store.latest_step() is None:
            raise ExportError(
                f"no checkpoint in {directory}; train first (hyphae node join) or pass --checkpoint DIR"
            )
        return store.load()
    except CheckpointError as exc:
        raise ExportError(f"cannot read the checkpoint: {exc}") from exc
