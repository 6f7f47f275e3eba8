"""The shared-seed ZO log: run-state keys, canonical order, and replaying a log onto weights.

Every projected gradient a peer computes is one log entry byte; a peer's bytes of one step form
one `Entry` (step, peer, data[j] for j = 0..m−1). The log is the canonical state of the run
(ALGORITHMS.md §3): the weights after step t are

    θ_{t+1} = θ_t − (η / √N_t) Σ_{peer, j} ĝ(peer, j) · z(seed(t, peer, j))   [then decay]

applied in canonical order — steps ascending, peers by id within a step, j ascending — where
N_t is the number of peers with an entry for step t. Each term is one fp32 add per element
(`zo_apply_`), coefficients computed in float64 on the host and rounded once to fp32, so the
same log replayed on any device gives the same bits.

Run-state layout (plain data only):
    zo/log/{step:012d}/{peer}   bytes, one byte per perturbation (`_zo_codec`)
    zo/snapshot/{step:012d}/{peer}
                                {"step", "hash", ...}: that peer's canonical weights at `step`
                                (each peer keeps its last two; a vote needs the others')
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import torch

from hyphae.kernels import zo_apply_
from hyphae.training._tensor_codec import encode_tensors
from hyphae.training._zo_codec import decode_byte
from hyphae.training.comm import blob_digest

__all__ = [
    "LOG_PREFIX",
    "SNAPSHOT_PREFIX",
    "TOPIC",
    "Entry",
    "SeedFn",
    "by_step",
    "entries_from_state",
    "log_key",
    "newest_agreed",
    "replay_",
    "snapshot_key",
    "step_coefficients",
    "weights_digest",
]

TOPIC = "zo"
"""`Comm.publish` topic of the per-step scalars."""

LOG_PREFIX = "zo/log/"
SNAPSHOT_PREFIX = "zo/snapshot/"

MAX_SEEDS_PER_CALL = 32
"""Seeds per `zo_apply_` call in a replay (a batch is bit-identical to applying one by one).
Measured on the CPU reference path, 10.8M parameters, one thread: 18 ms per update one at a
time, ~10 ms in batches of 8-32, 12 ms at 128 and 35 ms at 4096 (the kernel's hash budget
shrinks its span as the batch grows, so per-op overheads take over)."""

SeedFn = Callable[[int, str, int], int]
"""(step, peer id, j) -> the 64-bit seed of that perturbation."""


@dataclass(frozen=True, slots=True, order=True)
class Entry:
    """One peer's scalars of one step; ordering is the canonical order (step, peer)."""

    step: int
    peer: str
    data: bytes


def log_key(step: int, peer: str) -> str:
    """The run-state key of (step, peer)'s entry; zero-padded so keys sort by step."""
    return f"{LOG_PREFIX}{step:012d}/{peer}"


def snapshot_key(step: int, peer: str) -> str:
    """The run-state key of `peer`'s snapshot record for boundary `step`."""
    return f"{SNAPSHOT_PREFIX}{step:012d}/{peer}"


def _ballots(records: Mapping[str, Any], voters: Collection[str] | None) -> list[tuple[int, str, dict[str, Any]]]:
    """(step, hash, record) of each well-formed snapshot record, one per key.

    Records are untrusted (any member writes the run state): only keys of the exact form
    ``zo/snapshot/<12 digits>/<peer>`` count, their record's step must equal the key's, the hash
    must be a string, and, when ``voters`` is given, only those peers' records count — so a
    member cannot stuff the vote with made-up keys, nor crash it with odd types.
    """
    out = []
    for key, r in records.items():
        if not key.startswith(SNAPSHOT_PREFIX) or not isinstance(r, dict):
            continue
        step_text, _, peer = key[len(SNAPSHOT_PREFIX):].partition("/")
        if len(step_text) != 12 or not step_text.isdigit() or not peer or "/" in peer:
            continue
        step, digest = r.get("step"), r.get("hash")
        if isinstance(step, bool) or not isinstance(step, int) or step != int(step_text) or not isinstance(digest, str):
            continue
        if voters is None or peer in voters:
            out.append((step, digest, r))
    return out


def snapshot_votes(records: Mapping[str, Any], step: int, voters: Collection[str] | None = None) -> Counter[str]:
    """Hash -> how many peers recorded it for boundary `step` (`state_items(SNAPSHOT_PREFIX)`),
    counting only `voters`' records when given."""
    return Counter(h for s, h, _ in _ballots(records, voters) if s == step)


def newest_agreed(records: Mapping[str, Any], voters: Collection[str] | None = None) -> dict[str, Any] | None:
    """The record with the most votes at the newest boundary (ties: the smallest hash); only
    `voters`' records count when given and any of them voted, else every well-formed one."""
    ballots = _ballots(records, voters)
    if voters is not None and not ballots:
        ballots = _ballots(records, None)
    if not ballots:
        return None
    newest = max(s for s, _, _ in ballots)
    votes = Counter(h for s, h, _ in ballots if s == newest)
    best = min(votes, key=lambda h: (-votes[h], h))
    return next(r for s, h, r in ballots if s == newest and h == best)


def entries_from_state(
    items: Mapping[str, Any], *, start: int, stop: int | None = None, perturbations: int
) -> list[Entry]:
    """The log entries of steps [start, stop) in `items` (a `state_items(LOG_PREFIX)` answer).

    Entries whose value is not `perturbations` bytes are left out — by every peer alike, since
    the rule only reads the log — so a malformed write cannot fork the run.

    Returns:
        Entries in canonical order.
    """
    out = []
    for key, value in items.items():
        if not key.startswith(LOG_PREFIX):
            continue
        step_text, _, peer = key[len(LOG_PREFIX):].partition("/")
        if not step_text.isdigit() or not peer:
            continue
        step = int(step_text)
        if step < start or (stop is not None and step >= stop):
            continue
        if isinstance(value, bytes | bytearray) and len(value) == perturbations:
            out.append(Entry(step, peer, bytes(value)))
    out.sort()
    return out


def by_step(entries: Iterable[Entry]) -> list[list[Entry]]:
    """Canonically ordered entries grouped by step."""
    return [list(group) for _, group in groupby(sorted(entries), key=lambda e: e.step)]


def step_coefficients(entries: Sequence[Entry], lr: float, seed_of: SeedFn) -> tuple[list[int], list[float]]:
    """Seeds and coefficients of ONE step's entries in canonical order: c = −(η/√N_t)·ĝ.

    Raises:
        ValueError: the entries span more than one step.
    """
    if not entries:
        return [], []
    steps = {e.step for e in entries}
    if len(steps) != 1:
        raise ValueError(f"step_coefficients takes one step's entries, got steps {sorted(steps)[:4]}")
    scale = lr / math.sqrt(len(entries))
    seeds, coefs = [], []
    for e in sorted(entries):
        for j, b in enumerate(e.data):
            seeds.append(seed_of(e.step, e.peer, j))
            coefs.append(-scale * decode_byte(b))
    return seeds, coefs


@torch.no_grad()
def replay_(
    params: Sequence[torch.Tensor],
    entries: Iterable[Entry],
    *,
    lr: float,
    seed_of: SeedFn,
    decayed: Sequence[torch.Tensor] = (),
    weight_decay: float = 0.0,
) -> int:
    """Apply `entries` to `params` in canonical order, in place; returns the updates applied.

    Without weight decay consecutive steps are fused into `zo_apply_` calls of up to
    `MAX_SEEDS_PER_CALL` seeds (bit-identical to one call per update); with decay each step
    is applied, then `decayed` tensors are multiplied by (1 − η·λ).
    """
    pending_seeds: list[int] = []
    pending_coefs: list[float] = []
    applied = 0

    def flush() -> None:
        for i in range(0, len(pending_seeds), MAX_SEEDS_PER_CALL):
            zo_apply_(params, pending_seeds[i:i + MAX_SEEDS_PER_CALL], pending_coefs[i:i + MAX_SEEDS_PER_CALL])
        pending_seeds.clear()
        pending_coefs.clear()

    for group in by_step(entries):
        seeds, coefs = step_coefficients(group, lr, seed_of)
        pending_seeds.extend(seeds)
        pending_coefs.extend(coefs)
        applied += len(seeds)
        if weight_decay:
            flush()
            decay_(decayed, lr, weight_decay)
    flush()
    return applied


def decay_(decayed: Sequence[torch.Tensor], lr: float, weight_decay: float) -> None:
    """θ ← θ·(1 − η·λ) on the decayed tensors (one IEEE multiply per element)."""
    factor = 1.0 - lr * weight_decay
    for p in decayed:
        p.mul_(factor)


def weights_digest(named: Mapping[str, torch.Tensor]) -> str:
    """The content address of named weights: sha256 of their HYT1 encoding (= `put_tensors`)."""
    return blob_digest(encode_tensors(dict(named)))
