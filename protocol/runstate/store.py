"""Persistence: the run state in the data dir, written atomically, re-verified when loaded.

The file holds the signed envelopes the replica keeps (each stream's current epoch: its snapshot
and the deltas since), not a raw pycrdt state: loading offers every envelope again, signature and
rules included, so a file edited by hand, truncated or copied from another machine can never put
anything into the replica that its authors did not sign. Its size is what compaction bounds:
each stream holds at most ``2 * compact_after_deltas`` deltas on top of one snapshot.

Layout: ``msgpack {"v": 1, "run": name, "envelopes": [bytes, ...]}``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgpack

from ..atomic import atomic_write_bytes
from ..errors import ProtocolViolation
from .state import RunState
from .wire import Envelope, decode_envelope

__all__ = ["RunStore", "FILE_NAME", "MAX_FILE_BYTES", "encode_file", "decode_file"]

log = logging.getLogger(__name__)

FILE_NAME = "runstate.msgpack"
FILE_VERSION = 1
MAX_FILE_BYTES = 512 * 1024 * 1024


def encode_file(run: str, envelopes: list[Envelope]) -> bytes:
    return msgpack.packb({"v": FILE_VERSION, "run": run, "envelopes": [e.encode() for e in envelopes]},
                         use_bin_type=True)


def decode_file(data: bytes, run: str) -> list[Envelope]:
    """Decode a saved file; bad envelopes are skipped (logged), a bad file raises.

    Raises:
        ProtocolViolation: not a run state file, another version, or another run.
    """
    try:
        content = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True,
                                  max_bin_len=len(data), max_str_len=len(data))
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise ProtocolViolation(f"not a run state file ({type(exc).__name__}: {exc})") from None
    if not isinstance(content, dict) or content.get("v") != FILE_VERSION or not isinstance(content.get("envelopes"), list):
        raise ProtocolViolation(f"not a version {FILE_VERSION} run state file")
    if content.get("run") != run:
        raise ProtocolViolation(f"the file holds run {content.get('run')!r}, not {run!r}")
    out: list[Envelope] = []
    for raw in content["envelopes"]:
        try:
            out.append(decode_envelope(raw))
        except ProtocolViolation as exc:
            log.warning("skipping a malformed envelope in the run state file: %s", exc)
    return out


class RunStore:
    """Saves a :class:`RunState` to ``path`` when it changed, and loads it back.

    Args:
        path: the file (its directory is created); e.g. ``DATA_DIR/runs/<run>/runstate.msgpack``.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._saved_version = -1
        self._pending_version = -1
        self.last_size_bytes = 0

    def load(self, state: RunState) -> int:
        """Offer the saved envelopes to ``state``; return how many were applied.

        A file that cannot be read as a run state is moved aside (``.corrupt``) with a warning,
        and the node starts empty: its peers have everything it had, and sync brings it back.
        """
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return 0
        try:
            if size > MAX_FILE_BYTES:
                raise ProtocolViolation(f"{size} bytes, limit {MAX_FILE_BYTES}")
            envelopes = decode_file(self.path.read_bytes(), state.run)
        except ProtocolViolation as exc:
            aside = self.path.with_suffix(".corrupt")
            log.warning("cannot load %s (%s); moved it to %s and starting from what peers send", self.path, exc, aside)
            os.replace(self.path, aside)
            return 0
        received = state.receive(envelopes)
        self._saved_version = state.version
        self.last_size_bytes = size
        if received.rejected:
            log.warning("%d saved envelope(s) failed verification and were dropped", len(received.rejected))
        return len(received.applied)

    def snapshot(self, state: RunState) -> bytes | None:
        """The file content if ``state`` changed since the last save, else None (cheap; call it
        in the loop that owns ``state``, then :meth:`write` anywhere)."""
        if state.version == self._saved_version:
            return None
        self._pending_version = state.version
        return encode_file(state.run, state.envelopes())

    def write(self, data: bytes) -> None:
        """Write what :meth:`snapshot` returned, atomically (safe in a worker thread)."""
        atomic_write_bytes(self.path, data, mode=0o600)
        self._saved_version = self._pending_version
        self.last_size_bytes = len(data)

    def save(self, state: RunState) -> bool:
        """Save now if changed; True if a file was written."""
        data = self.snapshot(state)
        if data is None:
            return False
        self.write(data)
        return True
