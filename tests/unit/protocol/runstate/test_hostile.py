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
