"""Write rules and view resolution: pure functions over plain values."""

from __future__ import annotations

import pytest
from pycrdt import Doc, Map, Text

from hyphae.protocol.runstate.doc import (checkpoint_index, effective_config, expert_owners, materialize,
                                          new_section_doc, run_owner)
from hyphae.protocol.runstate.rules import WRITERS_KEY, RuleContext, SectionRule, WriteRejected, default_rules

RULES = default_rules()
A, B, C = "12D3KooWA", "12D3KooWB", "12D3KooWC"


def check(section: str, author: str, new: dict, old: dict | None = None, ctx: RuleContext | None = None) -> None:
    RULES[section].check(author, old or {}, new, ctx or RuleContext("r", owner=A))


@pytest.mark.parametrize("section,new", [
    ("genesis", {"created_ms": 5}),
    ("member", {"addrs": ["/ip4/1.2.3.4/tcp/1"], "roles": ["trainer"], "last_seen_ms": 9, "left": False,
                "hardware": {"cpus": 2}, "future_field": "kept"}),
    ("progress", {"step": 10, "loss": 2.5, "phase": "warmup", "done": False, "eta": None}),
    ("experts", {"0": {"since": 3}, "17": {"since": 3}}),
    ("checkpoints", {"ckpt-100": {"step": 100, "hash": "ab12", "size_bytes": 10, "kind": "model"}}),
    ("blobs", {"ab12": 10}),
    ("zo_log", {"12": "00ff7f"}),
])
def test_well_formed_values_pass(section: str, new: dict) -> None:
    check(section, B, new)


@pytest.mark.parametrize("section,new,match", [
    ("genesis", {"created_ms": -1}, "int in"),
    ("genesis", {"owner": B}, "only created_ms"),
    ("member", {"peer_id": C}, "writes only its own entry"),
    ("member", {"addrs": "not a list"}, "list of at most"),
    ("member", {"left": "yes"}, "true or false"),
    ("member", {"last_seen_ms": 1.5}, "int in"),
    ("progress", {"step": [1, 2]}, "number, string"),
    ("experts", {"x": {"since": 1}}, "expert number"),
    ("experts", {"07": {"since": 1}}, "expert number"),
    ("experts", {"70000": {"since": 1}}, "expert number"),
    ("experts", {"3": {"since": 1, "extra": 2}}, "since"),
    ("checkpoints", {"c": {"step": 1, "hash": "XYZ", "size_bytes": 1}}, "lowercase hex"),
    ("checkpoints", {"c": {"hash": "ab", "size_bytes": 1}}, "step"),
    ("blobs", {"zz": 1}, "hex hash"),
    ("zo_log", {"1": "abc"}, "hex"),
    ("zo_log", {"one": "ab"}, "step number"),
])
def test_malformed_values_are_rejected(section: str, new: dict, match: str) -> None:
    with pytest.raises(WriteRejected, match=match):
        check(section, B, new)


def test_genesis_is_written_once() -> None:
    check("genesis", B, {"created_ms": 5}, old={"created_ms": 5})
    with pytest.raises(WriteRejected, match="written once"):
        check("genesis", B, {"created_ms": 1}, old={"created_ms": 5})


def test_only_the_owner_writes_config() -> None:
    entry = {"lr": {"v": 0.1, "ts": 1}}
    check("config", A, entry)
    with pytest.raises(WriteRejected, match="may not write config key 'lr'"):
        check("config", B, entry)
    with pytest.raises(WriteRejected, match="owner is not known"):
        check("config", A, entry, ctx=RuleContext("r", owner=None))


def test_delegates_write_only_their_keys() -> None:
    ctx = RuleContext("r", owner=A, config_writers={"lr": frozenset({B})})
    check("config", B, {"lr": {"v": 0.2, "ts": 2}}, ctx=ctx)
    with pytest.raises(WriteRejected, match="'batch'"):
        check("config", B, {"batch": {"v": 8, "ts": 2}}, ctx=ctx)
    with pytest.raises(WriteRejected, match=WRITERS_KEY):
        check("config", B, {WRITERS_KEY: {"v": {"batch": [B]}, "ts": 2}}, ctx=ctx)
    # a delegate whose key was revoked may still remove it (removals are always allowed)
    check("config", B, {}, old={"lr": {"v": 0.2, "ts": 2}}, ctx=RuleContext("r", owner=A))


def test_config_entries_have_exact_shape() -> None:
    with pytest.raises(WriteRejected, match="must be"):
        check("config", A, {"lr": 0.1})
    with pytest.raises(WriteRejected, match="must match"):
        check("config", A, {"Bad Key": {"v": 1, "ts": 1}})


def test_section_rule_validates_its_own_config() -> None:
    with pytest.raises(ValueError, match="section name"):
        SectionRule(section="Bad", check=lambda *a: None)
    with pytest.raises(ValueError, match="max_keys"):
        SectionRule(section="ok", check=lambda *a: None, max_keys=0)


# ---- the document schema --------------------------------------------------------------------------


def test_materialize_reads_back_exact_json_types() -> None:
    value = {"step": 3, "loss": 1.0, "name": "x", "flags": [1, "a", None], "nested": {"k": True}}
    state, back, _ = materialize([new_section_doc(value).get_update()], RULES["progress"])
    assert back == value and isinstance(back["step"], int) and isinstance(back["loss"], float)
    assert materialize([state], RULES["progress"]).value == value


def _doc_update(fill) -> bytes:
    doc = Doc()
    fill(doc)
    return doc.get_update()


@pytest.mark.parametrize("update,match", [
    (b"\xff\x01garbage", "does not decode"),
    (_doc_update(lambda d: d.get("other", type=Map).__setitem__("k", "1")), "only the root"),
    (_doc_update(lambda d: d.get("s", type=Map).__setitem__("k", 5)), "JSON string"),
    (_doc_update(lambda d: d.get("s", type=Map).__setitem__("k", Map({"a": "1"}))), "JSON string"),
    (_doc_update(lambda d: d.get("s", type=Map).__setitem__("k", Text("zz"))), "not JSON"),
    (_doc_update(lambda d: d.get("s", type=Map).__setitem__("k", "{not json")), "not JSON"),
    (_doc_update(lambda d: d.get("s", type=Map).__setitem__("k", "[" * 5000 + "]" * 5000)), "bytes, limit"),
    (_doc_update(lambda d: d.get("s", type=Map).__setitem__("k" * 200, "1")), "characters"),
], ids=["garbage", "other-root", "int", "map", "text", "bad-json", "deep", "long-key"])  # fixed: xdist compares ids
def test_materialize_refuses_malformed_documents(update: bytes, match: str) -> None:
    with pytest.raises(WriteRejected, match=match):
        materialize([update], RULES["progress"])


def test_materialize_enforces_key_and_state_limits() -> None:
    many = new_section_doc({str(i): "x" for i in range(65)}).get_update()
    with pytest.raises(WriteRejected, match="65 entries, limit 64"):
        materialize([many], RULES["progress"])
    small = SectionRule(section="tiny", check=lambda *a: None, max_state_bytes=50)
    with pytest.raises(WriteRejected, match="state is"):
        materialize([new_section_doc({"k": "v" * 100}).get_update()], small)


# ---- resolving views -------------------------------------------------------------------------------


def test_owner_is_the_earliest_genesis_unless_pinned() -> None:
    genesis = {B: {"created_ms": 10}, C: {"created_ms": 10}, A: {"created_ms": 11}}
    assert run_owner(genesis) == B  # tie at 10 broken by peer id
    assert run_owner(genesis, pinned=A) == A
    assert run_owner({}) is None


def test_effective_config_is_last_writer_wins_among_allowed_writers() -> None:
    configs = {
        A: {"lr": {"v": 0.1, "ts": 5}, "batch": {"v": 8, "ts": 5}, WRITERS_KEY: {"v": {"lr": [B]}, "ts": 5}},
        B: {"lr": {"v": 0.2, "ts": 6}, "batch": {"v": 99, "ts": 9}},   # batch not delegated: ignored
        C: {"lr": {"v": 0.3, "ts": 99}},                                # not a writer at all: ignored
    }
    assert effective_config(configs, A) == {"batch": 8, "lr": 0.2}
    assert effective_config(configs, None) == {}


def test_expert_owner_is_the_earliest_live_claim() -> None:
    claims = {A: {"0": {"since": 5}, "1": {"since": 5}}, B: {"0": {"since": 3}}, C: {"1": {"since": 5}}}
    assert expert_owners(claims, [A, B, C]) == {0: B, 1: A}
    assert expert_owners(claims, [A, C]) == {0: A, 1: A}  # B gone: its expert goes to the next claim
    assert expert_owners(claims, [C]) == {1: C}


def test_checkpoint_providers_are_live_holders_of_the_hash() -> None:
    manifests = {A: {"c1": {"step": 1, "hash": "aa", "size_bytes": 3}, "c2": {"step": 2, "hash": "bb", "size_bytes": 3}}}
    blobs = {B: {"aa": 3}, C: {"aa": 3}}
    index = checkpoint_index(manifests, blobs, [A, B])
    assert [m["id"] for m in index] == ["c2", "c1"]
    assert index[1]["providers"] == [A, B] and index[0]["providers"] == [A]
