"""What one hostile member can no longer do to the run state: write another member's algo entry,
flood the topic, or send undecodable / forged envelopes without its score dropping."""

from __future__ import annotations

import pytest

from hyphae.protocol.runstate import RunState, RunStateNode, WriteRejected, sign_envelope
from hyphae.protocol.runstate.rules import RuleContext, default_rules
from hyphae.protocol.runstate.service import ENVELOPE_RATE
from hyphae.protocol.scoring import scores_for

RULES = default_rules()


def test_an_algo_key_ending_in_a_peer_id_is_only_that_peers(ids) -> None:
    a, b = ids[0].peer_id, ids[1].peer_id
    ctx = RuleContext("r", owner=a)
    entry = {"v": "00", "ts": 5}
    RULES["algo"].check(a, {}, {f"zo/log/000000000001/{a}": entry, "blob/ff": entry, "plain": entry}, ctx)
    for key in (f"zo/log/000000000001/{b}", f"zo/snapshot/000000000100/{b}", f"ckpt/{b}", b):
        with pytest.raises(WriteRejected, match="only it may write"):
            RULES["algo"].check(a, {}, {key: entry}, ctx)
        with pytest.raises(WriteRejected, match="only it may write"):  # deleting it is writing it
            RULES["algo"].check(a, {key: entry}, {key: {"v": None, "ts": 6}}, ctx)


def test_a_member_cannot_overwrite_another_members_log_entry_in_the_merged_view(ids) -> None:
    alice, mallory = RunState("r", ids[0]), RunState("r", ids[1])
    key = f"zo/log/000000000003/{ids[0].peer_id}"
    alice.write("algo", {key: {"v": "honest", "ts": 10}})
    with pytest.raises(WriteRejected):
        mallory.write("algo", {key: {"v": "forged", "ts": 2**62}})
    assert alice.newest("algo")[key] == "honest"


class _Host:
    """Enough of a Host for the validator (it only keys the score table)."""

    def __init__(self) -> None:
        self.peer_id = f"local-{id(self)}"


def _validator(ids):
    host = _Host()
    state = RunState("r", ids[0])
    return RunStateNode(host, state)._gossip_validator(), scores_for(host)


def test_the_gossip_validator_scores_forgeries_and_refuses_floods(ids) -> None:
    validate, scores = _validator(ids)
    mallory = ids[2]
    assert not validate(mallory.peer_id, b"\x93garbage")
    assert scores.scores()[mallory.peer_id]["violations"] == {"runstate.invalid": 1}
    good = sign_envelope(mallory, "r", "progress", 1, 0, b"\x00")
    forged = sign_envelope(mallory, "r", "progress", 1, 0, b"\x00", author=ids[3].peer_id)
    assert not validate(mallory.peer_id, forged.encode())
    assert scores.score(mallory.peer_id) < -19.9
    sender = ids[4].peer_id
    verdicts = [validate(sender, good.encode()) for _ in range(int(ENVELOPE_RATE.burst) + 50)]
    assert verdicts.count(False) >= 10 and verdicts[0]  # the bucket refills a little meanwhile
    assert scores.scores()[sender]["violations"]["runstate.rate"] >= 10
    assert validate(ids[0].peer_id, b"anything from ourselves is not judged here")


def test_a_timestamp_beyond_the_clock_skew_bound_is_refused_so_nobody_owns_a_shared_key_for_good(ids) -> None:
    from hyphae.protocol.runstate.rules import MAX_CLOCK_SKEW_MS

    from .conftest import FakeClock

    now = FakeClock()
    year_ahead = FakeClock(now.now_s + 365 * 86400)  # mallory's clock, or mallory's lie
    reader, honest = RunState("r", ids[0], clock=now), RunState("r", ids[2], clock=now)
    mallory = RunState("r", ids[1], clock=year_ahead)
    mallory.write("algo", {"shared": {"v": "mine for a year", "ts": int(year_ahead() * 1000)}})
    mallory.set_member(roles=["trainer"])
    refused = reader.receive(mallory.envelopes()).rejected
    assert refused and all("ahead of this node's clock" in why for _, why in refused)
    honest.write("algo", {"shared": {"v": "honest", "ts": int(now() * 1000)}})
    assert not reader.receive(honest.envelopes()).rejected
    assert reader.newest("algo")["shared"] == "honest"
    assert ids[1].peer_id not in reader.members()
    # A clock a little ahead (within the skew bound) is an honest clock: accepted.
    skewed = RunState("r", ids[3], clock=FakeClock(now.now_s + MAX_CLOCK_SKEW_MS / 1000 - 60))
    skewed.write("algo", {"other": {"v": "fine", "ts": int(skewed.clock() * 1000)}})
    skewed.set_member(roles=["trainer"])
    assert not reader.receive(skewed.envelopes()).rejected
    assert reader.newest("algo")["other"] == "fine" and ids[3].peer_id in reader.members()
