"""The ZO snapshot vote reads records any member may write: odd types never crash it, made-up
keys and non-voters never win it."""

from hypothesis import given, settings
from hypothesis import strategies as st

from hyphae.training._zo_log import SNAPSHOT_PREFIX, newest_agreed, snapshot_key, snapshot_votes

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                         max_size=3),
                           max_leaves=8)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.one_of(st.text(max_size=40), st.text(max_size=20).map(lambda t: SNAPSHOT_PREFIX + t)),
                       st.one_of(json_values, st.fixed_dictionaries({"step": json_values, "hash": json_values})),
                       max_size=8))
def test_any_records_give_a_vote_or_none_never_an_exception(records: dict) -> None:
    newest_agreed(records)
    newest_agreed(records, voters={"a"})
    snapshot_votes(records, 100)


def test_made_up_keys_and_non_members_do_not_outvote_the_members() -> None:
    records = {snapshot_key(100, p): {"step": 100, "hash": "good"} for p in ("a", "b")}
    records.update({snapshot_key(100, f"sybil{i}"): {"step": 100, "hash": "evil"} for i in range(5)})
    records[f"{SNAPSHOT_PREFIX}100/x"] = {"step": 100, "hash": "evil"}  # not 12 digits
    records[snapshot_key(100, "c")] = {"step": 99, "hash": "evil"}  # step differs from its key
    assert snapshot_votes(records, 100, voters={"a", "b", "c"}) == {"good": 2}
    assert newest_agreed(records, voters={"a", "b", "c"})["hash"] == "good"
    assert snapshot_votes(records, 100)["evil"] == 5  # unfiltered, the made-up peers would have won
