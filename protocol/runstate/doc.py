"""The document schema: how a section lives in pycrdt, and how the run's view is resolved. Pure.

A section of one author is one pycrdt :class:`~pycrdt.Doc` with a single root map ``"s"`` whose
values are canonical JSON strings. Strings, because pycrdt turns ints into floats (``3`` comes
back ``3.0``) and nested shared types would let a value carry unbounded history; one JSON string
per entry keeps types exact and every entry's size checkable.

The view functions at the end resolve what several authors wrote into what the algorithms use
(owner, effective config, expert owners, checkpoint providers). They take plain dicts and are
deterministic, so every replica holding the same streams computes the same view.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from pycrdt import Doc, Map

from .rules import WRITERS_KEY, SectionRule, WriteRejected

__all__ = [
    "SECTION_ROOT",
    "encode_entry",
    "materialize",
    "Materialized",
    "new_section_doc",
    "section_map",
    "run_owner",
    "config_writers",
    "effective_config",
    "expert_owners",
    "checkpoint_index",
]

SECTION_ROOT = "s"
MAX_KEY_CHARS = 128


def encode_entry(value: Any) -> str:
    """Canonical JSON for one entry (sorted keys, no spaces, no NaN).

    Raises:
        ValueError: ``value`` is not plain JSON (e.g. bytes, NaN, a set).
    """
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run state values must be plain JSON (str, int, float, bool, None, list, "
                         f"dict with str keys); {exc}") from None


def section_map(doc: Doc) -> Map:
    return doc.get(SECTION_ROOT, type=Map)


def new_section_doc(value: Mapping[str, Any]) -> Doc:
    """A fresh document holding ``value``: no history, no tombstones (an epoch's snapshot)."""
    doc = Doc()
    root = section_map(doc)
    with doc.transaction():
        for key, entry in value.items():
            root[key] = encode_entry(entry)
    return doc


class Materialized(NamedTuple):
    """A section document read back: compact state, decoded value, and the raw JSON of each
    entry (kept so the next read decodes only entries that changed)."""

    state: bytes
    value: dict[str, Any]
    raw: dict[str, str]


def materialize(updates: Sequence[bytes], rule: SectionRule,
                previous: Materialized | None = None) -> Materialized:
    """Apply ``updates`` (a snapshot, then deltas) to a scratch document; return its compact
    state and its value, after checking the section's limits.

    Args:
        updates: pycrdt updates, applied in order to a fresh document.
        rule: the section's rule (limits).
        previous: the last result for this stream; unchanged entries are not decoded again.

    Raises:
        WriteRejected: an update does not decode, the document has foreign roots or non-string
            entries, an entry is not JSON, or a limit of ``rule`` is exceeded.
    """
    doc = Doc()
    for update in updates:
        try:
            doc.apply_update(update)
        except (ValueError, RuntimeError) as exc:
            raise WriteRejected(f"update does not decode as a pycrdt update ({exc})"[:300]) from None
    roots = set(doc.keys())
    if roots - {SECTION_ROOT}:
        raise WriteRejected(f"section document may hold only the root {SECTION_ROOT!r}, "
                            f"found {sorted(roots)[:4]}")
    raw: dict[str, Any] = {}
    if roots:
        try:  # one JSON dump in Rust, one parse in C: far cheaper than pycrdt's per-key to_py()
            raw = json.loads(str(section_map(doc)))
        except (ValueError, RecursionError) as exc:
            raise WriteRejected(f"{rule.section} document does not read back as JSON ({exc})"[:300]) from None
    if len(raw) > rule.max_keys:
        raise WriteRejected(f"{rule.section} holds {len(raw)} entries, limit {rule.max_keys}")
    value: dict[str, Any] = {}
    for key, text in raw.items():
        if previous is not None and previous.raw.get(key) == text and isinstance(text, str):
            value[key] = previous.value[key]
        else:
            value[key] = _decode_entry(key, text, rule)
    state = doc.get_update()
    if len(state) > rule.max_state_bytes:
        raise WriteRejected(f"{rule.section} state is {len(state)} bytes, limit {rule.max_state_bytes}")
    return Materialized(state, value, raw)


def _decode_entry(key: str, raw: Any, rule: SectionRule) -> Any:
    if len(key) > MAX_KEY_CHARS:
        raise WriteRejected(f"{rule.section} key of {len(key)} characters, limit {MAX_KEY_CHARS}")
    if not isinstance(raw, str):  # a nested map or array; shared text reads back as its string
        raise WriteRejected(f"{rule.section}[{key[:40]!r}] must be a JSON string, got {type(raw).__name__}")
    if len(raw) > rule.max_value_bytes:
        raise WriteRejected(f"{rule.section}[{key[:40]!r}] is {len(raw)} bytes, limit {rule.max_value_bytes}")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise WriteRejected(f"{rule.section}[{key[:40]!r}] is not JSON ({type(exc).__name__})") from None


# ---- resolving the view ------------------------------------------------------------------------


def run_owner(genesis: Mapping[str, Mapping[str, Any]], pinned: str | None = None) -> str | None:
    """The run's owner: ``pinned`` if given, else the author of the earliest genesis (ties by
    peer id). Deterministic, but trust-on-first-use: pin the owner for runs that need it."""
    if pinned is not None:
        return pinned
    candidates = [(int(v["created_ms"]), peer) for peer, v in genesis.items() if "created_ms" in v]
    return min(candidates)[1] if candidates else None


def config_writers(owner_config: Mapping[str, Any]) -> dict[str, frozenset[str]]:
    """Which peers, besides the owner, may write which config key (the owner's ``@writers``)."""
    entry = owner_config.get(WRITERS_KEY)
    if not isinstance(entry, dict) or not isinstance(entry.get("v"), dict):
        return {}
    return {key: frozenset(p for p in peers if isinstance(p, str))
            for key, peers in entry["v"].items() if isinstance(peers, list)}


def effective_config(configs: Mapping[str, Mapping[str, Any]], owner: str | None) -> dict[str, Any]:
    """The run config: for each key, the latest write (by ``ts``, then peer id) among the owner
    and the peers the owner delegated that key to. Writes by anyone else are ignored, so a
    replica that accepted a write before it knew the owner still shows the same config."""
    if owner is None or owner not in configs:
        return {}
    writers = config_writers(configs[owner])
    best: dict[str, tuple[int, str, Any]] = {}
    for peer, value in configs.items():
        for key, entry in value.items():
            if key == WRITERS_KEY or not isinstance(entry, dict):
                continue
            if peer != owner and peer not in writers.get(key, frozenset()):
                continue
            candidate = (int(entry.get("ts", 0)), peer, entry.get("v"))
            if key not in best or candidate[:2] > best[key][:2]:
                best[key] = candidate
    return {key: best[key][2] for key in sorted(best)}


def expert_owners(claims: Mapping[str, Mapping[str, Any]], live: Iterable[str]) -> dict[int, str]:
    """Expert -> owner among live members: the claim with the smallest ``since`` wins, ties by
    peer id. A member that goes away loses its experts to the next claimant automatically."""
    alive = set(live)
    best: dict[int, tuple[int, str]] = {}
    for peer, value in claims.items():
        if peer not in alive:
            continue
        for key, claim in value.items():
            candidate = (int(claim["since"]), peer)
            expert = int(key)
            if expert not in best or candidate < best[expert]:
                best[expert] = candidate
    return {expert: best[expert][1] for expert in sorted(best)}


def checkpoint_index(checkpoints: Mapping[str, Mapping[str, Any]], blobs: Mapping[str, Mapping[str, Any]],
                     live: Iterable[str]) -> list[dict[str, Any]]:
    """Every manifest, newest step first, with the live peers that can serve its hash (the
    producer plus members listing the hash in ``blobs``)."""
    alive = set(live)
    holders: dict[str, set[str]] = {}
    for peer, value in blobs.items():
        for digest in value:
            holders.setdefault(digest, set()).add(peer)
    out = []
    for producer, value in checkpoints.items():
        for ident, manifest in value.items():
            providers = ({producer} | holders.get(manifest["hash"], set())) & alive
            out.append({**manifest, "id": ident, "producer": producer, "providers": sorted(providers)})
    out.sort(key=lambda m: (-int(m["step"]), m["producer"], m["id"]))
    return out
