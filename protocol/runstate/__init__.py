"""Replicated run state: a signed, rule-checked CRDT store over the control plane (no torch).

What the run shares — members, config, expert ownership, checkpoint manifests, per-peer progress,
the zeroth-order scalar log — every member replicates; any member may be hostile or buggy.

Design
------
**Streams, not one shared document.** A pycrdt update can touch any part of a document, and
pycrdt exposes no decoder that tells which items an update creates or deletes and under which
parent. Checking "Alice wrote only her own entry" on one shared document would mean re-implementing
the yrs update format. So the run document is partitioned by construction: every author has one
pycrdt document per *section* (``member``, ``progress``, ``config``, ...), a *stream*
``(author, section)`` that only its author writes. The run's state is the union of all streams;
:mod:`.doc` resolves it into the views algorithms use (``live_members()``, the config, expert
owners, checkpoint providers), deterministically.

**Signatures.** Every change is an :class:`~.wire.Envelope`: run name, author peer id, section,
``(epoch, seq)``, the pycrdt update bytes, and an Ed25519 signature by the author over all of
them (the peer id holds the public key, so no key exchange is needed). An envelope can only ever
change its author's stream, so every applied change is attributable to the key that signed it.

**Write rules** (:mod:`.rules`): a rule per section says who may write it and what it may hold.
A receiver applies an envelope to a scratch copy of the stream's document, decodes the result
and runs the rule on (old value, new value) before keeping anything: a member entry claiming
another peer id, a non-owner writing config (or a delegate writing a key it was not given), a
changed genesis, malformed JSON, oversized sections all fail there, on every node, with a logged
reason. A rejected envelope is not stored, so it is never re-published or served in sync; a
pubsub validator in the libp2p thread also stops gossipsub from forwarding envelopes with bad
signatures or config writes from non-owners. Rules that depend on other streams (who owns the
run) are re-applied when views are built, so replicas that learned things in different orders
still show the same view.

**Anti-entropy** (``/hyphae/runsync/1``): pubsub is lossy, so every few seconds, on every new
connection, and when a peer's heads show it has more, a node sends its *heads* (per stream:
epoch, seq, 8 bytes of the tip's digest) and gets back the **signed envelopes** it lacks — never
raw state — and verifies each exactly as if it came by pubsub. Sync cannot smuggle anything
that its author did not sign and the rules did not pass. Envelopes a pull brings are re-published
(a few at most), so a repair reaches the puller's pubsub neighbours at once. Heartbeats are not
pushed at all: in py-libp2p 0.8.1 a pubsub delivery costs milliseconds of CPU, so N members
pushing heartbeats cost O(N^2) deliveries a second; pulled, they ride on the anti-entropy rounds.

**Compaction.** Within an epoch an author's stream is a snapshot (seq 0) plus deltas. After
``compact_after_deltas`` deltas (or when the log outgrows the section) the author starts a new
epoch: a *fresh* pycrdt document holding only the current values (no tombstones, no history),
signed as seq 0. Receivers replace the whole stream with it. So the snapshot is signed by its
maker, the only writer of that stream, and checkable like any envelope; each stream holds at most
one snapshot plus ``2 * compact_after_deltas`` deltas (receivers refuse longer chains), and the
ZO log is bounded by its author truncating entries before a ZO snapshot boundary (the section's
``max_keys`` refuses unbounded growth). Every process start also starts new epochs, which is what
makes a restarted node's writes safe even if its data dir was lost.

**Persistence** (:mod:`.store`): the envelopes held, written atomically, re-verified on load.
**Membership** (:mod:`.membership`): heartbeats in the member entry; live / suspect / gone.

Public API: :class:`RunState` (writes, receive, views), :class:`RunStateNode` /
:func:`open_run_state` (the network side), :class:`RunStore`, the rule table.
"""

from .doc import checkpoint_index, effective_config, expert_owners, run_owner
from .log import Offer, Outcome, Replica, Stream
from .membership import GONE, LIVE, SUSPECT, MembershipConfig, member_status
from .rules import RuleContext, SectionRule, WriteRejected, default_rules
from .service import RunStateNode, SyncConfig, make_pubsub_validator, open_run_state
from .state import Received, RunState, RunStateConfig
from .store import RunStore
from .wire import (SYNC_PROTOCOL, Envelope, Head, SyncReply, SyncRequest, check_peer_id, check_run_name,
                   decode_envelope, parse_sync_reply, parse_sync_request, sign_envelope, topic_for, verify_envelope)

__all__ = [
    "RunState",
    "RunStateConfig",
    "Received",
    "RunStateNode",
    "SyncConfig",
    "open_run_state",
    "make_pubsub_validator",
    "RunStore",
    "Replica",
    "Stream",
    "Offer",
    "Outcome",
    "SectionRule",
    "RuleContext",
    "WriteRejected",
    "default_rules",
    "MembershipConfig",
    "member_status",
    "LIVE",
    "SUSPECT",
    "GONE",
    "Envelope",
    "Head",
    "SyncRequest",
    "SyncReply",
    "SYNC_PROTOCOL",
    "topic_for",
    "check_run_name",
    "check_peer_id",
    "sign_envelope",
    "verify_envelope",
    "decode_envelope",
    "parse_sync_request",
    "parse_sync_reply",
    "run_owner",
    "effective_config",
    "expert_owners",
    "checkpoint_index",
]
