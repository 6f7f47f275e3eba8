"""The scenario report: timestamped events and invariant checks, written as JSON.

A scenario never stops at the first failed check: every check is recorded with what was
measured and the limit it was held to, so one report tells the whole story of a run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hyphae.protocol.atomic import atomic_write_json

__all__ = ["Report", "Event", "Check"]

log = logging.getLogger(__name__)


@dataclass
class Event:
    """Something the scenario did (or saw happen): a kill, a partition, a netem change."""

    t_s: float
    """Seconds since the scenario started."""
    unix: float
    kind: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Check:
    """One invariant, checked once, with the evidence."""

    name: str
    passed: bool
    t_s: float
    waited_s: float
    """How long it took to hold (or how long we waited before giving up)."""
    limit: dict[str, Any]
    measured: dict[str, Any]


class Report:
    """Collects events and checks; :meth:`to_json` is what ``--json PATH`` writes."""

    def __init__(self, scenario: str, *, topology: str, settings: dict[str, Any]) -> None:
        self.scenario = scenario
        self.topology = topology
        self.settings = settings
        self.started_unix = time.time()
        self._t0 = time.monotonic()
        self.events: list[Event] = []
        self.checks: list[Check] = []
        self.nodes: list[dict[str, Any]] = []
        self.measurements: dict[str, Any] = {}
        self.error: str | None = None

    def elapsed(self) -> float:
        return round(time.monotonic() - self._t0, 3)

    def event(self, kind: str, **detail: Any) -> None:
        self.events.append(Event(self.elapsed(), round(time.time(), 3), kind, detail))
        log.info("scenario %s: %s %s", self.scenario, kind, detail)

    def check(self, name: str, passed: bool, *, waited_s: float, limit: dict[str, Any],
              measured: dict[str, Any]) -> bool:
        self.checks.append(Check(name, bool(passed), self.elapsed(), round(waited_s, 3), limit, measured))
        (log.info if passed else log.warning)("scenario %s: check %s %s after %.1f s", self.scenario, name,
                                              "held" if passed else "FAILED", waited_s)
        return bool(passed)

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "topology": self.topology,
            "passed": self.passed,
            "started_unix": round(self.started_unix, 3),
            "duration_s": self.elapsed(),
            "settings": self.settings,
            "nodes": self.nodes,
            "events": [asdict(e) for e in self.events],
            "checks": [asdict(c) for c in self.checks],
            "measurements": self.measurements,
            "error": self.error,
        }

    def write(self, path: Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, self.to_json())
