"""The node's side of closed runs: read the run secret and allowlist the config points at.

The secret comes from ``HYPHAE_RUN_SECRET`` or from ``run_secret_file`` (never from the config
file itself, which ``/api/v1/node`` shows); the allowlist from ``run_allowlist``, a file made
by the run's creator with ``hyphae run allowlist``. See :mod:`hyphae.protocol.admission`.

A secret file that other users may read (or write) is refused, as ssh refuses such a private
key: whoever can read it is admitted to the run, and a leaked secret cannot be taken back.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from hyphae.protocol.admission import Admission, AdmissionError, load_allowlist, make_allowlist
from hyphae.protocol.identity import load_or_create_identity

from .config import ConfigError, NodeConfig
from .datadir import DataDir

__all__ = ["load_admission", "write_allowlist", "SECRET_ENV"]

SECRET_ENV = "HYPHAE_RUN_SECRET"


def _secret(config: NodeConfig, env: Mapping[str, str]) -> bytes | None:
    if env.get(SECRET_ENV):
        return env[SECRET_ENV].encode()
    if config.run_secret_file is None:
        return None
    path = Path(config.run_secret_file)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(f"permissions {mode:04o} for run_secret_file {path} are too open: other users "
                              f"could read the secret and join the run; run: chmod 600 {path}")
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read run_secret_file {path}: {exc.strerror or exc}") from None
    if not secret:
        raise ConfigError(f"run_secret_file {path} is empty")
    return secret


def load_admission(config: NodeConfig, env: Mapping[str, str] | None = None) -> tuple[Admission, str | None]:
    """The run's admission policy, and the allowlist's creator (the run owner) if there is one.

    Raises:
        ConfigError: an unreadable or too short secret, or an allowlist that does not check out.
    """
    env = os.environ if env is None else env
    creator, allowlist = None, None
    try:
        if config.run_allowlist is not None:
            creator, allowlist = load_allowlist(Path(config.run_allowlist), config.run, config.run_owner)
        return Admission.closed_by(config.run, secret=_secret(config, env), allowlist=allowlist), creator
    except AdmissionError as exc:
        raise ConfigError(str(exc)) from None


def write_allowlist(data_dir: Path, run: str, peers: list[str], out: Path) -> str:
    """Sign an allowlist for ``run`` with this node's key (it becomes the run's creator)."""
    identity = load_or_create_identity(DataDir(data_dir).identity_key)
    try:
        make_allowlist(identity, run, peers, out)
    except AdmissionError as exc:
        raise ConfigError(str(exc)) from None
    return identity.peer_id
