"""Atomic, verified, resumable checkpoints: `CheckpointStore`.

Layout of a store directory (one writer per directory):

    step-00000100/
        weights.pt      model state_dict (torch.save)
        state.pt        strategy + data position + RNG (torch.save; tensors and plain data)
        manifest.json   step, algorithm, model config, sha256 of both files, time
    step-00000200/ ...

Atomicity: a checkpoint is written into a hidden `.tmp-*` directory — each file written,
flushed and fsynced, the manifest last — then renamed to `step-XXXXXXXX` and the parent
directory fsynced. A crash at any point leaves either no new checkpoint or a complete one; a
directory without a manifest is never listed, stale temp directories are removed on the next
save. The last `keep_last` checkpoints are kept; an old one is renamed to a hidden name before it
is deleted, so a crash mid-delete never leaves a listed checkpoint with files missing.

Safety: loading never unpickles arbitrary objects (`torch.load(weights_only=True)`), and both
files are hashed and compared with the manifest before they are parsed.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(Exception):
    """A checkpoint cannot be written or read (missing, unreadable, wrong format)."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint file does not match the sha256 its manifest records."""


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """What a checkpoint holds; `weights_sha256` is the content address of the weights."""

    step: int
    algorithm: str
    model_config: dict[str, Any]
    weights_sha256: str
    state_sha256: str
    created_unix: float
    extra: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, where: Path) -> Manifest:
        try:
            data = json.loads(text)
            manifest = cls(**data)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(f"{where}: unreadable manifest ({exc}); delete this checkpoint") from exc
        if manifest.format != FORMAT_VERSION:
            raise CheckpointError(
                f"{where}: checkpoint format {manifest.format}, this code reads {FORMAT_VERSION}"
            )
        return manifest


@dataclass(frozen=True)
class Checkpoint:
    """A loaded checkpoint: its manifest, model weights and training state."""

    manifest: Manifest
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    path: Path


class CheckpointStore:
    """A directory of checkpoints, newest last.

    Args:
        directory: where checkpoints live (created if missing).
        keep_last: how many complete checkpoints to keep (older ones are deleted on save).
    """

    def __init__(self, directory: str | Path, *, keep_last: int = 3) -> None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an integer >= 1, got {keep_last!r}")
        self.directory = Path(directory)
        self.keep_last = keep_last

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints (those with a manifest), ascending."""
        if not self.directory.is_dir():
            return []
        found = []
        for child in self.directory.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and (child / "manifest.json").is_file():
                found.append(int(m.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def path_of(self, step: int) -> Path:
        return self.directory / f"step-{step:08d}"

    def save(
        self,
        *,
        step: int,
        algorithm: str,
        model_config: Mapping[str, Any],
        weights: Mapping[str, torch.Tensor],
        state: Mapping[str, Any],
        extra: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Write a checkpoint atomically and prune old ones.

        Args:
            step: training steps completed; names the checkpoint (re-saving a step replaces it).
            algorithm: the strategy's name.
            model_config: `ModelConfig.to_dict()`.
            weights: the model's state_dict.
            state: strategy/data/RNG state (tensors and plain data only).
            extra: small JSON-able facts for the manifest (run id, ...).

        Returns:
            The manifest written.

        Raises:
            CheckpointError: the directory cannot be written.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temps()
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=self.directory))
        installed = False
        try:
            weights_sha = _write_torch(tmp / "weights.pt", dict(weights))
            state_sha = _write_torch(tmp / "state.pt", dict(state))
            manifest = Manifest(
                step=step, algorithm=algorithm, model_config=dict(model_config),
                weights_sha256=weights_sha, state_sha256=state_sha, created_unix=time.time(),
                extra=dict(extra or {}),
            )
            _write_file(tmp / "manifest.json", manifest.to_json().encode())
            _fsync_dir(tmp)
            self._install(tmp, self.path_of(step))
            installed = True
        finally:
            if not installed:
                shutil.rmtree(tmp, ignore_errors=True)
        self._prune()
        logger.info("checkpoint step %d written to %s", step, self.path_of(step))
        return manifest

    def load(self, step: int | None = None, *, map_location: str | torch.device = "cpu") -> Checkpoint:
        """Load and verify a checkpoint (the newest when `step` is None).

        Raises:
            CheckpointError: no such checkpoint, or it cannot be read.
            CheckpointCorrupt: a file's sha256 differs from the manifest.
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint in {self.directory}")
        path = self.path_of(step)
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise CheckpointError(f"no complete checkpoint for step {step} in {self.directory}")
        manifest = Manifest.from_json(manifest_path.read_text(), where=path)
        weights = _read_torch(path / "weights.pt", manifest.weights_sha256, map_location)
        state = _read_torch(path / "state.pt", manifest.state_sha256, map_location)
        return Checkpoint(manifest, weights, state, path)

    def _install(self, tmp: Path, final: Path) -> None:
        old = None
        if final.exists():  # re-save of the same step: move the old one aside first
            old = final.with_name(f".tmp-old-{final.name}-{os.getpid()}")
            os.rename(final, old)
        os.rename(tmp, final)
        _fsync_dir(self.directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _prune(self) -> None:
        for step in self.steps()[: -self.keep_last]:
            # Hide it (one atomic rename) before deleting: a kill in the middle of rmtree would
            # otherwise leave a listed checkpoint with its manifest but not all of its files.
            path = self.path_of(step)
            doomed = path.with_name(f".tmp-prune-{path.name}-{os.getpid()}")
            os.rename(path, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    def _remove_stale_temps(self) -> None:
        for child in self.directory.iterdir():
            if child.name.startswith(".tmp-") and child.is_dir():
                shutil.rmtree(child, ignore_errors=True)


def _write_torch(path: Path, obj: dict[str, Any]) -> str:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    _write_file(path, data)
    return hashlib.sha256(data).hexdigest()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_torch(path: Path, expected_sha: str, map_location: str | torch.device) -> Any:
    """Read, verify, then parse: the bytes parsed are exactly the bytes hashed."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc})") from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha:
        raise CheckpointCorrupt(
            f"{path}: sha256 {actual[:16]}… does not match the manifest's {expected_sha[:16]}…; "
            "the file is corrupt or was modified — restore it or load an older checkpoint"
        )
    try:
        return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for a malformed archive
        raise CheckpointError(f"{path}: not a loadable weights-only archive ({exc})") from exc
