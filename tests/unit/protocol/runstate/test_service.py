"""The gossipsub validator: what it refuses is neither delivered nor forwarded by pubsub."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from hyphae.protocol.runstate.doc import new_section_doc
from hyphae.protocol.runstate.service import SyncConfig, make_pubsub_validator
from hyphae.protocol.runstate.state import RunState
from hyphae.protocol.runstate.wire import sign_envelope


def message(env) -> SimpleNamespace:
    return SimpleNamespace(data=env.encode())


def test_validator_forwards_only_signed_known_and_authorized_envelopes(ids, clock) -> None:
    owner, other = ids[0], ids[1]
    state = RunState("run-1", ids[2], clock=clock)
    validate = make_pubsub_validator(state)
    snapshot = new_section_doc({"step": 1}).get_update()
    good = sign_envelope(other, "run-1", "progress", 5, 0, snapshot)
    assert validate(None, message(good))
    assert not validate(None, message(dataclasses.replace(good, sig=bytes(64))))
    assert not validate(None, message(sign_envelope(other, "run-2", "progress", 5, 0, snapshot)))
    assert not validate(None, message(sign_envelope(other, "run-1", "unknown", 5, 0, snapshot)))
    assert not validate(None, SimpleNamespace(data=b"\x00garbage"))
    config = new_section_doc({"lr": {"v": 1, "ts": 1}}).get_update()
    assert validate(None, message(sign_envelope(other, "run-1", "config", 5, 0, config)))  # owner unknown yet
    state.receive([sign_envelope(owner, "run-1", "genesis", 5, 0, new_section_doc({"created_ms": 1}).get_update())])
    assert not validate(None, message(sign_envelope(other, "run-1", "config", 5, 0, config)))
    assert validate(None, message(sign_envelope(owner, "run-1", "config", 5, 0, config)))


def test_sync_config_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="anti_entropy_interval_s must be > 0"):
        SyncConfig(anti_entropy_interval_s=0)
    with pytest.raises(ValueError, match="max_reply_bytes"):
        SyncConfig(max_reply_bytes=1 << 30)
