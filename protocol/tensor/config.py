"""Configuration of the tensor plane (one per daemon)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .connect import parse_data_addr
from .wire import MAX_FRAME_BYTES, MIN_FRAME_BYTES, Limits

__all__ = ["TensorConfig"]

_MIN_FRAME, _MAX_FRAME = MIN_FRAME_BYTES, MAX_FRAME_BYTES


@dataclass(frozen=True, kw_only=True)
class TensorConfig:
    """How the tensor plane listens, dials, and what it accepts from peers."""

    listen: tuple[str, ...] = ("/ip4/0.0.0.0/tcp/0",)
    """Data listener addresses (``/ip4/A/tcp/P`` or ``/ip6/A/tcp/P``; port 0 picks one)."""
    announce: tuple[str, ...] = ()
    """Data addresses to advertise instead of the bound ones (e.g. a forwarded public port)."""
    direct_dial: bool = True
    """Try peers' data addresses before falling back to a libp2p stream. Off: always libp2p."""
    frame_bytes: int = 1 << 20
    """Plaintext bytes per DATA frame (and the largest frame accepted). 16 KiB - 16 MiB. 1 MiB
    keeps each frame's ciphertext in cache while it is decrypted into place; measured here, it
    beat 4 MiB frames against plain TCP (0.85 vs 0.75 of its throughput, interleaved runs)."""
    max_transfer_bytes: int = 4 << 30
    """Largest transfer accepted from a peer (decoded bytes of all its tensors)."""
    max_tensors: int = 4096
    """Most tensors in one transfer."""
    max_unclaimed_bytes: int = 2 << 30
    """Bytes of received transfers nobody has asked for yet; beyond it new ones are refused."""
    max_unclaimed_bytes_per_peer: int | None = None
    """The share of ``max_unclaimed_bytes`` one peer's transfers may hold (None: a quarter of it,
    512 MiB by default), so one peer filling the pool cannot keep every other peer's early
    transfers refused for the whole ``mailbox_ttl_s``. At most ``max_unclaimed_bytes``."""
    recv_pool_bytes: int = 512 << 20
    """Receive buffers kept for reuse once their tensors are gone (0: none). Reused memory
    decrypts twice as fast as fresh memory; idle buffers are released after a minute."""
    max_sessions_per_peer: int = 4
    """Data connections opened to one peer for concurrent outgoing transfers."""
    dial_timeout_s: float = 3.0
    """Give up a direct dial of one data address after this long."""
    handshake_timeout_s: float = 10.0
    """Give up the libp2p key agreement after this long."""
    idle_timeout_s: float = 120.0
    """Close a data connection unused for this long."""
    mailbox_ttl_s: float = 300.0
    """Drop a received transfer nobody claimed after this long."""

    def __post_init__(self) -> None:
        if not self.listen:
            raise ConfigError("tensor listen must name at least one address, e.g. /ip4/0.0.0.0/tcp/0")
        for addr in self.listen:
            _check_addr(addr, "tensor listen address", allow_wildcard=True)
        for addr in self.announce:
            _check_addr(addr, "tensor announce address", allow_wildcard=False)
        if not _MIN_FRAME <= self.frame_bytes <= _MAX_FRAME:
            raise ConfigError(f"frame_bytes must be in [{_MIN_FRAME}, {_MAX_FRAME}], got {self.frame_bytes}")
        if self.max_unclaimed_bytes_per_peer is None and isinstance(self.max_unclaimed_bytes, int):
            object.__setattr__(self, "max_unclaimed_bytes_per_peer", max(1, self.max_unclaimed_bytes // 4))
        for name in ("max_transfer_bytes", "max_tensors", "max_unclaimed_bytes", "max_unclaimed_bytes_per_peer",
                     "max_sessions_per_peer", "recv_pool_bytes"):
            value = getattr(self, name)
            least = 0 if name == "recv_pool_bytes" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"{name} must be an int >= {least}, got {value!r}")
        if self.max_unclaimed_bytes_per_peer > self.max_unclaimed_bytes:
            raise ConfigError(f"max_unclaimed_bytes_per_peer ({self.max_unclaimed_bytes_per_peer}) must be <= "
                              f"max_unclaimed_bytes ({self.max_unclaimed_bytes}): lower it or raise the total")
        for name in ("dial_timeout_s", "handshake_timeout_s", "idle_timeout_s", "mailbox_ttl_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)!r}")

    @property
    def limits(self) -> Limits:
        return Limits(max_frame_bytes=self.frame_bytes, max_transfer_bytes=self.max_transfer_bytes,
                      max_tensors=self.max_tensors)


def _check_addr(addr: str, what: str, *, allow_wildcard: bool) -> None:
    parts = addr.split("/")
    if allow_wildcard and len(parts) == 5 and parts[2] in ("0.0.0.0", "::") and parts[3] == "tcp":
        if parts[4].isdigit() and int(parts[4]) < 65536:
            return
    if allow_wildcard and len(parts) == 5 and parts[3] == "tcp" and parts[4] == "0":
        addr = "/".join(parts[:4] + ["1"])  # port 0 = any: check the rest
    try:
        parse_data_addr(addr)
    except ValueError as exc:
        raise ConfigError(f"{what}: {exc}") from exc
