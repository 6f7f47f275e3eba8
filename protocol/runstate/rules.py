"""Who may write what in the run state: one rule per section (top-level key), pure.

Every change lives in a stream ``(author, section)`` that only ``author`` can sign, so "a member
writes only its own entry" holds by construction: there is no envelope that could put bytes into
another member's stream. What is left for the rules is (a) whether ``author`` may write
``section`` at all (``config`` only by the run owner or peers it delegated keys to) and (b) whether
the new content is well-formed and bounded. A rule sees the section's value before and after the
envelope (plain JSON-like dicts) plus a :class:`RuleContext` (the run, its owner, delegations) and
raises :class:`WriteRejected` with a reason; per-entry rules check only the entries that changed. Receivers drop rejected envelopes: they are not
stored, not re-published and not served in sync.

Timestamps that decide who wins (``ts`` of config and algo entries, where the newest write wins,
and a member's ``last_seen_ms`` / ``joined_ms``) may be at most :data:`MAX_CLOCK_SKEW_MS` ahead of
the receiving replica's clock (``RuleContext.clock_ms``): a member writing a ts years ahead would
otherwise own a shared key for good. Time only moves forward, so an entry accepted once stays
acceptable when rules are re-checked later.

Default rules (the table is pluggable: pass your own ``rules`` to the RunState):

============  ===============================  ===========================================================
section       writer                           content
============  ===============================  ===========================================================
genesis       any member, once                 ``created_ms``; the earliest genesis names the run owner
config        the owner; delegates for the     ``key -> {"v": value, "ts": ms}``; ``@writers`` (owner only)
              keys ``@writers`` names          maps a key to the peers that may also write it
member        the member itself                addrs, roles, hardware, version, joined_ms, last_seen_ms, left
progress      the member itself                small scalars (step, tokens, loss, ...)
experts       the member itself                its expert claims ``"<e>" -> {"since": n}``; the earliest
                                               live claim wins, ties by peer id (see ``doc.expert_owners``)
checkpoints   the member that produced it      ``id -> {"step", "hash", "size_bytes", "kind"}``
blobs         the member itself                content hashes it can serve (``hash -> size_bytes``)
zo_log        the member itself                ``"<step>" -> hex of its 1-byte ZO scalars``; truncated at
                                               snapshots by the member (bounded by ``max_keys``)
algo          the member itself                the training algorithms' key-value state (``Comm.state_*``):
                                               ``key -> {"v": value, "ts": ms}``; readers merge every
                                               member's entries, newest write winning (``RunState.newest``);
                                               a key ending in ``/<peer id>`` only that peer may write
============  ===============================  ===========================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import HyphaeError

__all__ = [
    "WriteRejected",
    "RuleContext",
    "SectionRule",
    "Check",
    "default_rules",
    "WRITERS_KEY",
    "CONFIG_KEY_RE",
    "MAX_CLOCK_SKEW_MS",
]

WRITERS_KEY = "@writers"
CONFIG_KEY_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
_HEX_RE = re.compile(r"^[0-9a-f]*$")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")
MAX_EXPERT_ID = 65535
MAX_CLOCK_SKEW_MS = 300_000
"""How far ahead of this replica's clock a winning timestamp may be (5 minutes, as Kerberos)."""


class WriteRejected(HyphaeError):
    """A change broke a rule of the run state. Receivers drop it with this reason logged; a
    local write raises it before anything is published."""


@dataclass(frozen=True)
class RuleContext:
    """What rules may depend on besides the stream itself.

    ``owner`` is the run's owner as this replica currently knows it (pinned in the config, or the
    author of the earliest genesis); None while unknown. Rules that depend on it are re-checked
    when views are built, so a replica that learns the owner late still shows the same view.
    """

    run: str
    owner: str | None = None
    config_writers: Mapping[str, frozenset[str]] = field(default_factory=dict)
    clock_ms: Callable[[], int] | None = None
    """This replica's wall clock in ms; None (pure tests) skips the future-timestamp check."""


Check = Callable[[str, Mapping[str, Any], Mapping[str, Any], RuleContext], None]
"""``check(author, old_value, new_value, ctx)``: raise :class:`WriteRejected` to refuse."""


@dataclass(frozen=True, kw_only=True)
class SectionRule:
    """The rule for one section. Limits are enforced on every replica before ``check`` runs."""

    section: str
    """Section name (``[a-z][a-z0-9_]*``)."""
    check: Check
    """Content and authorization check; raise :class:`WriteRejected` to refuse."""
    max_keys: int = 256
    """Entries in the section."""
    max_value_bytes: int = 4096
    """Encoded JSON size of one entry."""
    max_state_bytes: int = 64 * 1024
    """Size of the section's pycrdt state (the snapshot an epoch starts with)."""
    compact_after_deltas: int = 64
    """The author starts a new epoch (a fresh snapshot) after this many deltas, so the log that
    sync replies and the data dir carry stays bounded."""
    priority: int = 50
    """Envelopes of lower priority are applied first in a batch (genesis, then config, ...), so
    rules that depend on them see them."""

    def __post_init__(self) -> None:
        if not re.match(r"^[a-z][a-z0-9_]{0,31}$", self.section):
            raise ValueError(f"section name must match [a-z][a-z0-9_]{{0,31}}, got {self.section!r}")
        for name in ("max_keys", "max_value_bytes", "max_state_bytes", "compact_after_deltas"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---- small checkers --------------------------------------------------------------------------


def _int(value: Any, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WriteRejected(f"{what} must be an int in {lo}..{hi}, got {value!r}"[:200])
    return value


def _str(value: Any, what: str, max_chars: int) -> str:
    if not isinstance(value, str) or len(value) > max_chars:
        raise WriteRejected(f"{what} must be a string of at most {max_chars} characters"[:200])
    return value


def _str_list(value: Any, what: str, max_items: int, max_chars: int) -> None:
    if not isinstance(value, list) or len(value) > max_items:
        raise WriteRejected(f"{what} must be a list of at most {max_items} strings")
    for item in value:
        _str(item, f"an entry of {what}", max_chars)


def _bool(value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise WriteRejected(f"{what} must be true or false, got {type(value).__name__}")


def _dict(value: Any, what: str) -> None:
    if not isinstance(value, dict):
        raise WriteRejected(f"{what} must be a map, got {type(value).__name__}")


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [k for k, v in new.items() if k not in old or old[k] != v]


def _changed_items(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Entries that are new or changed: unchanged ones passed the rule when they were written
    (the same rule on every replica), so a large section costs only what changed."""
    return [(k, v) for k, v in new.items() if k not in old or old[k] != v]


# ---- the default rules -----------------------------------------------------------------------


def _ts(value: Any, what: str, ctx: RuleContext) -> int:
    """A timestamp (ms) that is not beyond this replica's clock + MAX_CLOCK_SKEW_MS."""
    ts = _int(value, what)
    if ctx.clock_ms is not None:
        now = ctx.clock_ms()
        if ts > now + MAX_CLOCK_SKEW_MS:
            raise WriteRejected(f"{what} {ts} is {(ts - now) / 1000:.0f} s ahead of this node's clock, more than the "
                                f"{MAX_CLOCK_SKEW_MS // 1000} s skew allowed (the writer's clock is wrong, or it "
                                f"tries to win every later write); fix the clock (NTP)"[:300])
    return ts


def check_genesis(author: str, old: Mapping[str, Any], new: Mapping[str, Any], ctx: RuleContext) -> None:
    if set(new) - {"created_ms"}:
        raise WriteRejected(f"genesis holds only created_ms, got {sorted(new)[:8]}")
    if "created_ms" in new:
        _int(new["created_ms"], "genesis created_ms")
    if old and dict(old) != dict(new):
        raise WriteRejected("genesis is written once; a member may not change or remove it")


def check_config(author: str, old: Mapping[str, Any], new: Mapping[str, Any], ctx: RuleContext) -> None:
    for key, entry in _changed_items(old, new):
        if key != WRITERS_KEY and not CONFIG_KEY_RE.match(key):
            raise WriteRejected(f"config key {key[:80]!r} must match {CONFIG_KEY_RE.pattern}")
        if not isinstance(entry, dict) or set(entry) != {"v", "ts"}:
            raise WriteRejected(f"config entry {key!r} must be {{'v': value, 'ts': ms}}")
        _ts(entry["ts"], f"config {key} ts", ctx)
    if WRITERS_KEY in new:
        writers = new[WRITERS_KEY]["v"]
        if not isinstance(writers, dict):
            raise WriteRejected(f"config {WRITERS_KEY} must map config keys to lists of peer ids")
        for key, peers in writers.items():
            if not CONFIG_KEY_RE.match(key):
                raise WriteRejected(f"config {WRITERS_KEY} names an invalid key {key[:80]!r}")
            _str_list(peers, f"{WRITERS_KEY}[{key}]", 256, 128)
    if ctx.owner is None:
        raise WriteRejected("the run owner is not known yet (no genesis seen); config is accepted once it is "
                            "(anti-entropy offers it again)")
    if author == ctx.owner:
        return
    for key in _changed(old, new):
        if key == WRITERS_KEY:
            raise WriteRejected(f"only the run owner {ctx.owner} may write {WRITERS_KEY}")
        if author not in ctx.config_writers.get(key, frozenset()):
            raise WriteRejected(f"{author} may not write config key {key!r}: only the run owner {ctx.owner} "
                                f"and the peers it names in {WRITERS_KEY} may")


_MEMBER_FIELDS: dict[str, Callable[[Any, str], None]] = {
    "addrs": lambda v, w: _str_list(v, w, 32, 256),
    "roles": lambda v, w: _str_list(v, w, 16, 32),
    "version": lambda v, w: _str(v, w, 64),
    "agent": lambda v, w: _str(v, w, 128),
    "joined_ms": lambda v, w: _int(v, w),
    "last_seen_ms": lambda v, w: _int(v, w),
    "left": lambda v, w: _bool(v, w),
    "hardware": lambda v, w: _dict(v, w),
}


def check_member(author: str, old: Mapping[str, Any], new: Mapping[str, Any], ctx: RuleContext) -> None:
    # Unknown fields are allowed (a newer member may add some; refusing them would stall its
    # heartbeats on older nodes and make it look gone); known ones must have the right type.
    for key, validate in _MEMBER_FIELDS.items():
        if key in new:
            validate(new[key], f"member {key}")
    for key in ("joined_ms", "last_seen_ms"):
        if key in new:
            _ts(new[key], f"member {key}", ctx)
    if "peer_id" in new and new["peer_id"] != author:
        raise WriteRejected(f"member entry of {author} claims to be {str(new['peer_id'])[:60]}: a member "
                            f"writes only its own entry")


def check_progress(author: str, old: Mapping[str, Any], new: Mapping[str, Any], ctx: RuleContext) -> None:
    for key, value in _changed_items(old, new):
        if not isinstance(value, (int, float, str, bool)) and value is not None:
            raise WriteRejected(f"progress {key[:60]!r} must be a number, string, bool or null")


def check_experts(author: str, old: Mapping[str, Any], new: Mapping[str, Any], ctx: RuleContext) -> None:
    for key, claim in _changed_items(old, new):
        if not key.isdigit() or int(key) > MAX_EXPERT_ID or str(int(key)) != key:
            raise WriteRejected(f"expert claim key must be an expert number 0..{MAX_EXPERT_ID}, got {key[:20]!r}")
        if not isinstance(claim, dict) or set(claim) != {"since"}:
            raise WriteRejected(f"expert claim {key} must be {{'since': n}}")
        _int(claim["since"], f"expert {key} since")


def check_checkpoints(author: str, old: Mapping[str, Any], new: Mapping[str, Any], ctx: RuleContext) -> None:
    for key, manifest in _changed_items(old, new):
        if not _ID_RE.match(key):
            raise WriteRejected(f"checkpoint id {key[:80]!r} must match {_ID_RE.pattern}")
        if not isinstance(manifest, dict):
            raise WriteRejected(f"checkpoint {key} must be a manifest map")
        _int(manifest.get("step"), f"checkpoint {key} step")
        _int(manifest.get("size_bytes"), f"checkpoint {key} size_bytes")
        digest = _str(manifest.get("hash"), f"checkpoint {key} hash", 128)
        if not _HEX_RE.match(digest) or not digest:
            raise WriteRejected(f"checkpoint {key} hash must be lowercase hex")
        if "kind" in manifest:
            _str(manifest["kind"], f"checkpoint {key} kind", 32)


def check_blobs(author: str, old: Mapping[str, Any], new: Mapping[str, Any], ctx: RuleContext) -> None:
    for key, size in _changed_items(old, new):
        if not key or not _HEX_RE.match(key):
            raise WriteRejected(f"blob key must be a lowercase hex hash, got {key[:80]!r}")
        _int(size, f"blob {key[:16]} size")


def check_zo_log(author: str, old: Mapping[str, Any], new: Mapping[str, Any], ctx: RuleContext) -> None:
    for key, scalars in _changed_items(old, new):
        if not key.isdigit() or str(int(key)) != key:
            raise WriteRejected(f"zo_log key must be a step number, got {key[:20]!r}")
        if not isinstance(scalars, str) or len(scalars) % 2 or not _HEX_RE.match(scalars):
            raise WriteRejected(f"zo_log step {key} must be the hex of its 1-byte scalars")


ALGO_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./:-]{0,159}$")
_OWNED_SUFFIX_RE = re.compile(r"(?:^|/)(12D3KooW[1-9A-HJ-NP-Za-km-z]{44})$")
"""An Ed25519 peer id as the last segment of an algo key: that peer's own entry
(``zo/log/<step>/<peer>``, ``zo/snapshot/<step>/<peer>``, ``ckpt/<peer>``)."""


def check_algo(author: str, old: Mapping[str, Any], new: Mapping[str, Any], ctx: RuleContext) -> None:
    for key, entry in _changed_items(old, new):
        if not ALGO_KEY_RE.match(key):
            raise WriteRejected(f"algo key {key[:80]!r} must match {ALGO_KEY_RE.pattern}")
        owned = _OWNED_SUFFIX_RE.search(key)
        if owned is not None and owned.group(1) != author:
            # Newest-write-wins merges every member's entries: without this a member could
            # overwrite another's log entry or snapshot record (with a later ts) in every view.
            raise WriteRejected(f"algo key {key[:80]!r} belongs to {owned.group(1)}; only it may write it")
        if not isinstance(entry, dict) or set(entry) != {"v", "ts"}:
            raise WriteRejected(f"algo entry {key!r} must be {{'v': value, 'ts': ms}}")
        _ts(entry["ts"], f"algo {key} ts", ctx)


def default_rules() -> dict[str, SectionRule]:
    """The rule table documented in the module docstring."""
    rules = [
        SectionRule(section="genesis", check=check_genesis, max_keys=1, max_value_bytes=64,
                    max_state_bytes=1024, priority=0),
        SectionRule(section="config", check=check_config, max_keys=256, max_value_bytes=16 * 1024,
                    max_state_bytes=128 * 1024, priority=10),
        SectionRule(section="member", check=check_member, max_keys=32, max_value_bytes=4096,
                    max_state_bytes=16 * 1024, compact_after_deltas=16, priority=20),
        SectionRule(section="progress", check=check_progress, max_keys=64, max_value_bytes=256,
                    max_state_bytes=16 * 1024, compact_after_deltas=16),
        SectionRule(section="experts", check=check_experts, max_keys=4096, max_value_bytes=64,
                    max_state_bytes=128 * 1024),
        SectionRule(section="checkpoints", check=check_checkpoints, max_keys=256, max_value_bytes=1024,
                    max_state_bytes=128 * 1024),
        SectionRule(section="blobs", check=check_blobs, max_keys=1024, max_value_bytes=32,
                    max_state_bytes=128 * 1024),
        SectionRule(section="zo_log", check=check_zo_log, max_keys=4096, max_value_bytes=2048,
                    max_state_bytes=200 * 1024, compact_after_deltas=64),
        SectionRule(section="algo", check=check_algo, max_keys=8192, max_value_bytes=4096,
                    max_state_bytes=1024 * 1024, compact_after_deltas=64),
    ]
    return {rule.section: rule for rule in rules}
