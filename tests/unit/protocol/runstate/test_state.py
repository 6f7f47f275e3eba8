"""RunState: local writes, receiving, views, compaction, membership, sync answers (no network)."""

from __future__ import annotations

import dataclasses

import pytest

from hyphae.protocol.runstate.membership import MembershipConfig, member_status
from hyphae.protocol.runstate.rules import WriteRejected, default_rules
from hyphae.protocol.runstate.state import RunState, RunStateConfig
from hyphae.protocol.runstate.wire import Head, SyncRequest, sign_envelope
from hyphae.protocol.runstate.doc import new_section_doc

from .conftest import FakeClock


def make(ident, clock, **config) -> RunState:
    return RunState("run-1", ident, config=RunStateConfig(**config), clock=clock)


def everything(*states: RunState) -> list:
    return [env for s in states for env in s.envelopes()]


def test_a_write_on_the_owner_is_seen_by_another_node(ids, clock) -> None:
    owner, other = make(ids[0], clock), make(ids[1], clock)
    owner.create_run()
    owner.set_config({"lr": 0.1, "algorithm": "diloco"})
    owner.set_member(addrs=["/ip4/127.0.0.1/tcp/1"], roles=["trainer"])
    received = other.receive(owner.envelopes())
    assert not received.rejected and len(received.applied) == 3
    assert other.owner() == ids[0].peer_id
    assert other.run_config() == {"algorithm": "diloco", "lr": 0.1}
    assert other.live_members() == [ids[0].peer_id]


def test_a_non_owner_cannot_write_config_locally_or_remotely(ids, clock) -> None:
    owner, mallory, honest = make(ids[0], clock), make(ids[1], clock), make(ids[2], clock)
    owner.create_run()
    mallory.receive(owner.envelopes())
    with pytest.raises(WriteRejected, match="may not write config"):
        mallory.set_config({"lr": 9})
    # Bypass the local check: sign a config snapshot by hand.
    forged = sign_envelope(ids[1], "run-1", "config", 5, 0, new_section_doc({"lr": {"v": 9, "ts": 1}}).get_update())
    honest.receive(owner.envelopes())
    received = honest.receive([forged])
    assert received.rejected and "may not write config" in received.rejected[0][1]
    assert honest.run_config() == {} and forged not in honest.envelopes()
    # ... and it is never served to anyone who asks.
    assert forged.encode() not in honest.answer(SyncRequest("run-1", {}), 1 << 20).envelopes


def test_config_delegation_applies_once_the_delegation_arrives(ids, clock) -> None:
    owner, delegate, watcher = make(ids[0], clock), make(ids[1], clock), make(ids[2], clock)
    owner.create_run()
    delegate.receive(owner.envelopes())
    owner.delegate_config("lr", [ids[1].peer_id])
    delegate.receive(owner.envelopes())
    clock.advance(1)
    delegate.set_config({"lr": 0.5})
    # The watcher hears the delegate's write before the delegation: refused for now ...
    own = [e for e in delegate.envelopes() if e.author == ids[1].peer_id]
    watcher.receive([e for e in owner.envelopes() if e.section == "genesis"])
    assert watcher.receive(own).rejected
    # ... and accepted when anti-entropy offers it again after the delegation arrived.
    watcher.receive(owner.envelopes())
    assert watcher.receive(own).applied
    assert watcher.run_config() == {"lr": 0.5}


def test_writes_compact_into_new_epochs_and_the_log_stays_bounded(ids, clock) -> None:
    writer, reader = make(ids[0], clock), make(ids[1], clock)
    writer.set_member(addrs=[])
    rule = default_rules()["member"]
    for _ in range(10 * rule.compact_after_deltas):
        clock.advance(1)
        reader.receive([writer.heartbeat()])
    stream = reader.replica.streams[(ids[0].peer_id, "member")]
    assert stream.seq <= rule.compact_after_deltas
    assert stream.epoch > writer.replica.streams[(ids[0].peer_id, "member")].envelopes[0].epoch - 1
    assert len(writer.envelopes()) <= rule.compact_after_deltas + 1
    assert reader.value("member", ids[0].peer_id)["last_seen_ms"] == int(clock() * 1000)


def test_a_restarted_writer_starts_a_newer_epoch_from_its_saved_value(ids, clock) -> None:
    first = make(ids[0], clock)
    first.set_progress({"step": 7})
    again = make(ids[0], clock)
    again.receive(first.envelopes())
    env = again.set_progress({"step": 8})
    assert env.seq == 0 and env.epoch > first.envelopes()[0].epoch
    assert again.value("progress", ids[0].peer_id) == {"step": 8}


def test_another_process_with_our_key_makes_us_move_past_its_epoch(ids, clock) -> None:
    ours, twin = make(ids[0], clock), make(ids[0], clock)
    ours.set_progress({"step": 1})
    clock.advance(5)
    twin.set_progress({"step": 99})
    ours.receive(twin.envelopes())
    clock.advance(-10)  # even with a clock that went backwards
    env = ours.set_progress({"step": 2})
    assert env.epoch > twin.envelopes()[0].epoch


def test_zo_log_appends_truncates_and_is_bounded(ids, clock) -> None:
    state = make(ids[0], clock)
    for step in range(10):
        state.append_zo(step, bytes([step, 255 - step]))
    state.truncate_zo(before_step=8)
    assert state.zo_log(ids[0].peer_id) == {8: bytes([8, 247]), 9: bytes([9, 246])}
    small = dict(default_rules())
    small["zo_log"] = dataclasses.replace(small["zo_log"], max_keys=3)
    bounded = make(ids[1], clock, rules=small)
    for step in range(3):
        bounded.append_zo(step, b"\x01")
    with pytest.raises(WriteRejected, match="4 entries, limit 3"):
        bounded.append_zo(3, b"\x01")
    bounded.truncate_zo(before_step=2)
    bounded.append_zo(3, b"\x01")  # after truncation it fits again
    assert sorted(bounded.zo_log(ids[1].peer_id)) == [2, 3]


def test_expert_claims_resolve_the_same_on_every_replica(ids, clock) -> None:
    a, b = make(ids[0], clock), make(ids[1], clock)
    for s in (a, b):
        s.set_member(addrs=[])
    a.claim_experts([0, 1, 2], since=10)
    b.claim_experts([2, 3], since=5)
    a.receive(b.envelopes())
    b.receive(a.envelopes())
    assert a.expert_owners() == b.expert_owners() == {0: ids[0].peer_id, 1: ids[0].peer_id,
                                                      2: ids[1].peer_id, 3: ids[1].peer_id}
    b.leave()
    a.receive(b.envelopes())
    assert a.expert_owners() == {0: ids[0].peer_id, 1: ids[0].peer_id, 2: ids[0].peer_id}


def test_members_go_live_suspect_gone_and_are_forgotten(ids, clock) -> None:
    cfg = MembershipConfig(suspect_after_s=10, gone_after_s=30, forget_after_s=100)
    watcher, member = make(ids[0], clock, membership=cfg), make(ids[1], clock)
    member.set_member(addrs=[])
    watcher.receive(member.envelopes())
    peer = ids[1].peer_id
    statuses = []
    for dt in (5, 10, 20, 80):  # ages 5, 15, 35, 115 s
        clock.advance(dt)
        statuses.append(watcher.members().get(peer, {}).get("status"))
    assert statuses == ["live", "suspect", "gone", None]
    assert watcher.live_members() == []


def test_direct_contact_rescues_a_member_whose_clock_lags(ids, clock) -> None:
    cfg = MembershipConfig()
    lagging_clock = FakeClock(clock() - 60)  # its clock is a minute behind
    lagging = make(ids[1], lagging_clock)
    watcher = make(ids[0], clock)
    lagging.set_member(addrs=[])
    watcher.receive(lagging.envelopes())  # relayed: no live evidence
    assert watcher.members()[ids[1].peer_id]["status"] == "gone"
    watcher.note_alive(ids[1].peer_id)  # it talked to us directly just now
    assert watcher.members()[ids[1].peer_id]["status"] == "live"
    clock.advance(cfg.suspect_after_s + 1)
    assert watcher.members()[ids[1].peer_id]["status"] == "suspect"
    assert member_status({"last_seen_ms": int(clock() * 1000) + 10_000}, clock(), None, cfg)[0] == "live"
    assert member_status({"left": True, "last_seen_ms": int(clock() * 1000)}, clock(), clock(), cfg)[0] == "gone"


def test_sync_answers_send_only_what_is_missing(ids, clock) -> None:
    a, b = make(ids[0], clock), make(ids[1], clock)
    a.set_member(addrs=[])
    for _ in range(3):
        clock.advance(1)
        a.heartbeat()
    a.set_progress({"step": 1})
    everything_ = a.answer(b.sync_request(), 1 << 20)
    assert len(everything_.envelopes) == 5 and not everything_.more and not everything_.behind
    b.receive([a.envelopes()[0], a.envelopes()[1]])  # member snapshot + first delta
    partial = a.answer(b.sync_request(), 1 << 20)
    assert len(partial.envelopes) == 3
    cut = a.answer(b.sync_request(), 1)  # budget of 1 byte: one envelope, more to come
    assert len(cut.envelopes) == 1 and cut.more
    b.set_progress({"step": 5})
    assert a.answer(b.sync_request(), 1 << 20).behind  # b holds a stream a lacks


def test_a_head_with_a_foreign_tip_gets_the_whole_chain(ids, clock) -> None:
    a = make(ids[0], clock)
    a.set_member(addrs=[])
    for _ in range(2):
        clock.advance(1)
        a.heartbeat()
    key = (ids[0].peer_id, "member")
    stream = a.replica.streams[key]
    forked = SyncRequest("run-1", {key: Head(stream.epoch, 1, b"\x00" * 8)})
    assert len(a.answer(forked, 1 << 20).envelopes) == 3
    lagging = SyncRequest("run-1", {key: Head(stream.epoch, 1, stream.envelopes[1].digest[:8])})
    assert len(a.answer(lagging, 1 << 20).envelopes) == 1


def test_a_pinned_owner_must_be_a_peer_id(ids, clock) -> None:
    with pytest.raises(ValueError, match="owner must be an Ed25519 peer id"):
        RunStateConfig(owner="alice")
    pinned = make(ids[1], clock, owner=ids[0].peer_id)
    assert pinned.owner() == ids[0].peer_id  # known before any genesis
    pinned.create_run()
    assert pinned.owner() == ids[0].peer_id  # an earlier genesis by someone else changes nothing
