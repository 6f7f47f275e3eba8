"""How much a node accepts from peers, sized from the model its run trains (no I/O here).

Fixed limits cannot fit every run: a 1B-parameter fp32 model is a 4 GB weights blob and a 4 GB
pseudo-gradient, over a fixed 2 GiB pool and 512 MiB per peer, while a 10M model needs 40 MB.
So the daemon learns the model's state size (the bytes of its weights) and sizes from it:

* ``max_transfer_bytes``: one transfer carries at most the whole state (an exchange of all the
  weights, one member's pseudo-gradient), with ``headroom``;
* ``max_unclaimed_bytes_per_peer``: one peer's full-state transfer may arrive before this node
  asks for it (a faster member's gossip or all-reduce part), so each peer may hold that much;
* ``max_unclaimed_bytes``: ``early_peers`` such peers at once, the whole node's pool;
* ``max_blob_bytes``: a state blob a joiner fetches may hold ``blob_states`` copies of the
  model (weights, outer momentum, inner optimizer moments), with ``headroom``.

Nothing is ever sized below the plane's configured floor (:class:`TensorConfig` defaults), so
small models keep today's limits and only big ones raise them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from .config import TensorConfig

__all__ = ["TransferBudget", "budget_for_state", "DEFAULT_MAX_BLOB_BYTES"]

DEFAULT_MAX_BLOB_BYTES = 4 << 30
"""Largest blob fetched while the model's size is unknown (as large as one transfer)."""


@dataclass(frozen=True, kw_only=True)
class TransferBudget:
    """Byte limits of one node's tensor plane and blob fetches, and what they were sized from."""

    max_transfer_bytes: int
    max_unclaimed_bytes: int
    max_unclaimed_bytes_per_peer: int
    max_blob_bytes: int
    state_bytes: int = 0
    """The model state size they were sized from (0: not known, the configured floor)."""

    def __post_init__(self) -> None:
        for name in ("max_transfer_bytes", "max_unclaimed_bytes", "max_unclaimed_bytes_per_peer", "max_blob_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.max_unclaimed_bytes_per_peer > self.max_unclaimed_bytes:
            raise ValueError(f"max_unclaimed_bytes_per_peer ({self.max_unclaimed_bytes_per_peer}) must be <= "
                             f"max_unclaimed_bytes ({self.max_unclaimed_bytes})")
        if isinstance(self.state_bytes, bool) or not isinstance(self.state_bytes, int) or self.state_bytes < 0:
            raise ValueError(f"state_bytes must be an int >= 0, got {self.state_bytes!r}")

    @classmethod
    def of(cls, config: TensorConfig, max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES) -> TransferBudget:
        """The budget a plane starts with: its configured limits."""
        per_peer = config.max_unclaimed_bytes_per_peer or config.max_unclaimed_bytes
        return cls(max_transfer_bytes=config.max_transfer_bytes, max_unclaimed_bytes=config.max_unclaimed_bytes,
                   max_unclaimed_bytes_per_peer=per_peer, max_blob_bytes=max_blob_bytes)

    def describe(self) -> str:
        source = f"a model state of {_gb(self.state_bytes)}" if self.state_bytes else "the configured defaults"
        return (f"transfers up to {_gb(self.max_transfer_bytes)}, unclaimed {_gb(self.max_unclaimed_bytes_per_peer)} "
                f"per peer and {_gb(self.max_unclaimed_bytes)} in all, blobs up to {_gb(self.max_blob_bytes)} "
                f"(sized from {source})")


def budget_for_state(state_bytes: int, floor: TransferBudget, *, headroom: float = 1.25, early_peers: int = 2,
                     blob_states: int = 4) -> TransferBudget:
    """The budget for a model whose state (weights) is ``state_bytes``, never below ``floor``.

    Raises:
        ValueError: a negative size, headroom below 1, or fewer than one peer or state.
    """
    if isinstance(state_bytes, bool) or not isinstance(state_bytes, int) or state_bytes < 0:
        raise ValueError(f"state_bytes must be an int >= 0, got {state_bytes!r}")
    if not headroom >= 1.0 or early_peers < 1 or blob_states < 1:
        raise ValueError(f"headroom must be >= 1 and early_peers, blob_states >= 1, got "
                         f"{headroom!r}, {early_peers!r}, {blob_states!r}")
    one = math.ceil(state_bytes * headroom)
    per_peer = max(floor.max_unclaimed_bytes_per_peer, one)
    return replace(floor, max_transfer_bytes=max(floor.max_transfer_bytes, one),
                   max_unclaimed_bytes_per_peer=per_peer,
                   max_unclaimed_bytes=max(floor.max_unclaimed_bytes, early_peers * per_peer),
                   max_blob_bytes=max(floor.max_blob_bytes, blob_states * one), state_bytes=state_bytes)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"
