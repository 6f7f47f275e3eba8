"""Peer scores: violations by severity, decay, the disconnect threshold, bans, one table per host."""

import pytest

from hyphae.protocol.scoring import PeerScores, ScoringConfig, Severity, scores_for


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_violations_subtract_by_severity_and_decay_by_half_life() -> None:
    clock = Clock()
    s = PeerScores(ScoringConfig(half_life_s=10), clock=clock)
    assert s.report("p", "x.minor", Severity.MINOR) == -1
    assert s.report("p", "x.major", Severity.MAJOR) == -11
    clock.t += 10
    assert s.score("p") == pytest.approx(-5.5)
    clock.t += 1000
    assert s.score("p") == pytest.approx(0, abs=1e-9)
    assert s.score("stranger") == 0
    row = s.scores()["p"]
    assert row["violations"] == {"x.minor": 1, "x.major": 1} and row["last"] == "x.major"


def test_crossing_the_threshold_flags_once_tells_listeners_and_bans_after_disconnect() -> None:
    clock = Clock()
    s = PeerScores(ScoringConfig(disconnect_below=-100, ban_s=60), clock=clock)
    crossed: list[tuple[str, float]] = []
    s.add_listener(lambda peer, score: crossed.append((peer, score)))
    s.report("bad", "lie", Severity.SEVERE)
    assert s.over_threshold() == [] and not s.is_banned("bad")
    s.report("bad", "lie", Severity.SEVERE)
    s.report("bad", "lie", Severity.SEVERE)
    assert [p for p, _ in crossed] == ["bad"]  # told once, not at every later report
    assert s.over_threshold() == ["bad"] and s.is_banned("bad")
    s.mark_disconnected("bad")
    assert s.over_threshold() == [] and s.is_banned("bad")
    clock.t += 61
    assert not s.is_banned("bad")
    assert s.scores()["bad"]["disconnects"] == 1


def test_memory_is_bounded_in_peers_and_violation_names() -> None:
    s = PeerScores(ScoringConfig(max_peers=5, max_kinds=2))
    for i in range(50):
        s.report(f"p{i}", "x", Severity.MINOR)
    assert len(s) == 5
    for i in range(10):
        s.report("q", f"kind{i}", Severity.MINOR)
    assert set(s.scores()["q"]["violations"]) == {"kind0", "kind1", "other"}


def test_scores_list_worst_first() -> None:
    s = PeerScores()
    s.report("a", "x", Severity.MINOR)
    s.report("b", "x", Severity.SEVERE)
    assert list(s.scores()) == ["b", "a"]


@pytest.mark.parametrize("kwargs", [dict(half_life_s=0), dict(disconnect_below=5), dict(ban_s=-1), dict(max_peers=0)])
def test_bad_config_is_refused(kwargs) -> None:
    with pytest.raises(ValueError, match="must be"):
        ScoringConfig(**kwargs)


def test_one_table_per_local_peer_id_whether_given_a_host_or_the_id() -> None:
    class Host:
        def __init__(self, peer_id: str) -> None:
            self.peer_id = peer_id

    a, b = Host("local-a"), Host("local-b")
    assert scores_for(a) is scores_for("local-a") is scores_for(Host("local-a"))
    assert scores_for(a) is not scores_for(b)
