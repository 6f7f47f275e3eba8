"""Run admission: the secret's proof names both ends and never holds the secret; the signed
allowlist checks out only as its creator wrote it."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hyphae.protocol.admission import Admission, AdmissionError, load_allowlist, make_allowlist
from hyphae.protocol.errors import ProtocolViolation
from hyphae.protocol.hello import Hello
from hyphae.protocol.identity import Identity

A, B, C = (Identity.generate().peer_id for _ in range(3))
SECRET = b"correct horse battery staple!!"


def test_a_proof_is_accepted_only_from_its_sender_to_its_receiver_on_its_network() -> None:
    run = Admission.closed_by("r", secret=SECRET)
    proof = run.proof(A, B, "net")
    assert run.refusal(A, B, "net", proof) is None
    assert run.refusal(C, B, "net", proof)  # replayed by someone else
    assert run.refusal(A, C, "net", proof)  # replayed towards someone else
    assert run.refusal(A, B, "other", proof)
    assert "no proof" in run.refusal(A, B, "net", b"")
    assert SECRET not in proof and len(proof) == 32


def test_another_secret_or_another_run_gives_another_key() -> None:
    proof = Admission.closed_by("r", secret=SECRET).proof(A, B, "net")
    assert Admission.closed_by("r", secret=SECRET + b"x").refusal(A, B, "net", proof)
    assert Admission.closed_by("r2", secret=SECRET).refusal(A, B, "net", proof)


def test_an_open_run_admits_everyone_and_a_short_secret_is_refused_with_advice() -> None:
    open_run = Admission("r")
    assert not open_run.closed and open_run.proof(A, B, "n") == b""
    with pytest.raises(AdmissionError, match="at least 16"):
        Admission.closed_by("r", secret=b"short")
    assert "staple" not in repr(Admission.closed_by("r", secret=SECRET))


def test_allowlist_round_trip_and_every_tampering_is_caught(tmp_path) -> None:
    owner = Identity.generate()
    path = tmp_path / "allow.json"
    make_allowlist(owner, "r", [A, B], path)
    creator, peers = load_allowlist(path, "r", owner.peer_id)
    assert creator == owner.peer_id and peers == {owner.peer_id, A, B}
    run = Admission.closed_by("r", allowlist=peers)
    assert run.refusal(A, owner.peer_id, "n", b"") is None and "allowlist" in run.refusal(C, A, "n", b"")
    with pytest.raises(AdmissionError, match="is for run"):
        load_allowlist(path, "other", None)
    with pytest.raises(AdmissionError, match="run owner is"):
        load_allowlist(path, "r", A)
    data = json.loads(path.read_text())
    for field, value in (("peers", [*data["peers"], C]), ("owner", A), ("signature", "AAAA")):
        path.write_text(json.dumps({**data, field: value}))
        with pytest.raises(AdmissionError):
            load_allowlist(path, "r", None)
    with pytest.raises(AdmissionError, match="not a peer id"):
        make_allowlist(owner, "r", ["nonsense"], path)


@given(st.one_of(st.none(), st.integers(), st.text(max_size=50), st.lists(st.text(max_size=5), max_size=3),
                 st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5)))
def test_any_garbage_allowlist_file_is_a_clear_error(tmp_path_factory, data) -> None:
    path = tmp_path_factory.mktemp("a") / "allow.json"
    path.write_text(json.dumps(data))
    with pytest.raises(AdmissionError):
        load_allowlist(path, "r", None)


def test_hello_carries_a_bounded_proof() -> None:
    hello = Hello(agent="a", network="n", proof=b"p" * 32)
    assert Hello.from_wire(hello.to_wire()) == hello
    assert "proof" not in Hello(agent="a", network="n").to_wire()
    with pytest.raises(ProtocolViolation):
        Hello.from_wire({**hello.to_wire(), "proof": b"x" * 65})
    with pytest.raises(ProtocolViolation):
        Hello.from_wire({**hello.to_wire(), "proof": "text"})
