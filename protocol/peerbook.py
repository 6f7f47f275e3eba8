"""The peers this node has met, kept on disk so a restarted node can find its way back.

py-libp2p ships an SQLite peerstore, but what we must keep is small and specific: for each hyphae
peer that passed the hello check, its dialable addresses, when we last saw it and how we found it.
A JSON file written atomically is enough, survives kill -9, and can be read by a person.
The structure itself does no I/O except :meth:`PeerBook.load` and :meth:`PeerBook.save`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import atomic_write_json

__all__ = ["PeerBook", "PeerRecord"]

log = logging.getLogger(__name__)

_FORMAT = 1


@dataclass
class PeerRecord:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    last_seen: float = 0.0
    sources: list[str] = field(default_factory=list)


class PeerBook:
    """A bounded map peer id -> :class:`PeerRecord`, evicting the longest-unseen first."""

    def __init__(self, *, max_peers: int = 1000, max_addrs_per_peer: int = 8) -> None:
        self._records: dict[str, PeerRecord] = {}
        self.max_peers = max_peers
        self.max_addrs_per_peer = max_addrs_per_peer
        self.dirty = False

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._records

    def get(self, peer_id: str) -> PeerRecord | None:
        return self._records.get(peer_id)

    def record(self, peer_id: str, addrs: list[str], *, source: str, now: float | None = None) -> None:
        """Remember that ``peer_id`` was seen at ``addrs`` (newest addresses first)."""
        rec = self._records.get(peer_id) or PeerRecord(peer_id)
        merged = list(dict.fromkeys([*addrs, *rec.addrs]))[: self.max_addrs_per_peer]
        rec.addrs = merged
        rec.last_seen = time.time() if now is None else now
        if source not in rec.sources:
            rec.sources.append(source)
        self._records[peer_id] = rec
        self._evict()
        self.dirty = True

    def forget(self, peer_id: str) -> None:
        if self._records.pop(peer_id, None) is not None:
            self.dirty = True

    def most_recent(self, n: int, *, exclude: set[str] | None = None) -> list[PeerRecord]:
        exclude = exclude or set()
        recs = [r for r in self._records.values() if r.peer_id not in exclude and r.addrs]
        return sorted(recs, key=lambda r: r.last_seen, reverse=True)[:n]

    def _evict(self) -> None:
        if len(self._records) <= self.max_peers:
            return
        oldest = sorted(self._records.values(), key=lambda r: r.last_seen)
        for rec in oldest[: len(self._records) - self.max_peers]:
            del self._records[rec.peer_id]

    # ---- persistence -----------------------------------------------------------------------

    def save(self, path: Path) -> None:
        data = {
            "format": _FORMAT,
            "peers": [vars(r) for r in sorted(self._records.values(), key=lambda r: r.peer_id)],
        }
        atomic_write_json(path, data)
        self.dirty = False

    @classmethod
    def load(cls, path: Path, **kwargs: int) -> PeerBook:
        """Read ``path``; a missing file gives an empty book, a corrupt one is set aside."""
        book = cls(**kwargs)
        if not path.exists():
            return book
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("format") != _FORMAT:
                raise ValueError("not a hyphae peer book (unknown format)")
            for entry in data["peers"]:
                rec = PeerRecord(
                    peer_id=str(entry["peer_id"]),
                    addrs=[str(a) for a in entry["addrs"]][: book.max_addrs_per_peer],
                    last_seen=float(entry["last_seen"]),
                    sources=[str(s) for s in entry.get("sources", [])],
                )
                book._records[rec.peer_id] = rec
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            aside = path.with_suffix(path.suffix + ".corrupt")
            path.replace(aside)
            log.warning("peer book %s is unreadable (%s); moved to %s, starting empty", path, exc, aside)
            return cls(**kwargs)
        book._evict()
        return book
