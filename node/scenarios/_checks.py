"""The invariants a scenario checks, as pure functions of what the nodes' APIs answered.

Each returns ``(holds, measured)``: ``measured`` is the evidence that goes into the report, so
a failed check says which node disagreed and with what. Keeping them pure keeps them
unit-testable without daemons (tests/unit/node/scenarios).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["run_state_converged", "meshed", "progressed", "verify_checkpoints", "latest_checkpoint",
           "in_training_members"]


def run_state_converged(views: Mapping[str, Any], peer_of: Mapping[str, str]) -> tuple[bool, dict[str, Any]]:
    """Every live node's ``/api/v1/run`` agrees on the run, its owner and config, and lists every
    live node as ``live``.

    Args:
        views: node name -> its ``/api/v1/run`` JSON (or an exception if it did not answer).
        peer_of: node name -> peer id, for the nodes that are up now.

    Members that are down may be ``suspect`` on one node and ``gone`` on another for a while
    (each judges heartbeat ages by its own clock), so only the live nodes' status is compared.
    """
    down = sorted(name for name, v in views.items() if not isinstance(v, Mapping))
    good = {name: v for name, v in views.items() if isinstance(v, Mapping)}
    digests = {name: json.dumps([v.get("run"), v.get("owner"), v.get("config")], sort_keys=True)
               for name, v in good.items()}
    owners = sorted({str(v.get("owner")) for v in good.values()})
    missing: dict[str, list[str]] = {}
    wanted = {pid: name for name, pid in peer_of.items()}
    for name, view in good.items():
        live = {m["peer_id"] for m in view.get("members", []) if m.get("status") == "live"}
        lacking = sorted(wanted[p] for p in set(wanted) - live)
        if lacking:
            missing[name] = lacking
    holds = (not down and len(set(digests.values())) == 1 and None not in [v.get("owner") for v in good.values()]
             and not missing and len(good) == len(peer_of))
    return holds, {"nodes": len(good), "not_answering": down, "owners": owners,
                   "distinct_run_config_owner": len(set(digests.values())), "not_seen_live": missing}


def meshed(peer_lists: Mapping[str, Any], peer_of: Mapping[str, str], *, min_peers: int | None = None
           ) -> tuple[bool, dict[str, Any]]:
    """Every live node is connected (hello done) to every other live node, or to at least
    ``min_peers`` of them when given (a large testnet is not a full mesh: ``target_peers``)."""
    wanted = set(peer_of.values())
    short: dict[str, int] = {}
    for name, peers in peer_lists.items():
        if not isinstance(peers, Mapping):
            short[name] = -1
            continue
        seen = {p["peer_id"] for p in peers.get("peers", []) if p.get("agent")} & wanted
        need = len(wanted) - 1 if min_peers is None else min(min_peers, len(wanted) - 1)
        if len(seen) < need:
            short[name] = len(seen)
    return not short, {"nodes": len(peer_lists), "short_of_peers": short}


def progressed(before: Mapping[str, int], after: Mapping[str, Any], *, min_increase: int = 1
               ) -> tuple[bool, dict[str, Any]]:
    """Every node in ``before`` reports a training step at least ``min_increase`` above the one
    recorded there.

    Args:
        before: node name -> step at the start of the window.
        after: node name -> its ``/api/v1/training`` JSON now (or an exception).
        min_increase: steps to take; DiLoCo's H makes sure an outer all-reduce happened.
    """
    steps: dict[str, list[int | None]] = {}
    stuck = []
    for name, start in before.items():
        now = after.get(name)
        step = int(now["step"]) if isinstance(now, Mapping) else None
        steps[name] = [start, step]
        if step is None or step < start + min_increase:
            stuck.append(name)
    return not stuck, {"steps_from_to": steps, "not_progressing": sorted(stuck)}


def in_training_members(trainings: Mapping[str, Any], peer_id: str) -> tuple[bool, list[str]]:
    """Which trainers do not (yet) count ``peer_id`` among their training members."""
    missing = sorted(name for name, t in trainings.items()
                     if not isinstance(t, Mapping) or peer_id not in (t.get("members") or []))
    return not missing, missing


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoints(checkpoint_dir: Path) -> tuple[list[int], list[str]]:
    """Hash every checkpoint's files against its manifest (as the worker does before loading).

    Returns:
        (steps that verify, problems: ``step-N: weights.pt sha256 mismatch`` and the like).
        Hidden ``.tmp-*`` dirs (a save cut short by a kill) are not checkpoints and are skipped,
        and so is a checkpoint that vanishes while it is read: a live worker prunes an old one
        with one atomic rename, which is not damage.
    """
    good: list[int] = []
    bad: list[str] = []
    if not checkpoint_dir.is_dir():
        return good, bad
    for step_dir in sorted(checkpoint_dir.glob("step-*")):
        step, problems = _verify_one(step_dir)
        if problems and not step_dir.exists():
            continue  # pruned (renamed away whole) between the glob and the read
        if problems:
            bad.append(f"{step_dir.name}: {', '.join(problems)}")
        else:
            good.append(step)
    return sorted(good), bad


def _verify_one(step_dir: Path) -> tuple[int, list[str]]:
    """One checkpoint's step and what is wrong with it (nothing: it verifies)."""
    try:
        manifest = json.loads((step_dir / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        return -1, [f"unreadable manifest ({exc})"]
    problems = []
    for file, key in (("weights.pt", "weights_sha256"), ("state.pt", "state_sha256")):
        try:
            if _sha256(step_dir / file) != manifest.get(key):
                problems.append(f"{file} sha256 mismatch")
        except OSError as exc:
            problems.append(f"{file} unreadable ({exc.strerror})")
    return int(manifest["step"]), problems


def latest_checkpoint(checkpoint_dir: Path) -> int | None:
    """The newest checkpoint step that verifies (what a restart must resume at or after)."""
    good, _ = verify_checkpoints(checkpoint_dir)
    return good[-1] if good else None
