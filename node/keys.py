"""``hyphae keygen``: make the node's identity explicitly (it is otherwise made on first start)."""

from __future__ import annotations

from pathlib import Path

from hyphae.protocol.identity import create_identity

from .datadir import DataDir

__all__ = ["keygen"]


def keygen(data_dir: Path, *, force: bool = False) -> tuple[str, Path]:
    """Create ``DATA_DIR/identity.key``; return (peer id, key path).

    Raises:
        ConfigError: a key exists and ``force`` is false.
    """
    datadir = DataDir(data_dir)
    datadir.create()
    identity = create_identity(datadir.identity_key, overwrite=force)
    return identity.peer_id, datadir.identity_key
