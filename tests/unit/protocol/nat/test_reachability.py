"""The reachability record: verdicts from dial-back answers, expiry, and the API snapshot."""

from hyphae.protocol.nat.reachability import PRIVATE, PUBLIC, UNKNOWN, Probe, Reachability, Reservation


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make() -> tuple[Reachability, Clock]:
    clock = Clock()
    return Reachability(max_age_s=60.0, clock=clock), clock


def test_starts_unknown_and_one_successful_dial_back_makes_it_public() -> None:
    reach, clock = make()
    assert reach.state == UNKNOWN and reach.confidence == 0
    assert reach.record(Probe("s1", clock(), ok=("/ip4/198.51.100.10/tcp/4001",)))
    assert reach.state == PUBLIC and reach.confirmed() == ["/ip4/198.51.100.10/tcp/4001"]


def test_failed_dial_backs_make_it_private_and_a_refusal_is_no_evidence() -> None:
    reach, clock = make()
    assert not reach.record(Probe("s1", clock(), refused="relayed connection"))
    assert reach.state == UNKNOWN
    reach.record(Probe("s2", clock(), failed=("/ip4/198.51.100.101/tcp/4001",)))
    reach.record(Probe("s3", clock(), failed=("/ip4/198.51.100.101/tcp/4001",)))
    assert reach.state == PRIVATE and reach.confidence == 2 and reach.confirmed() == []


def test_public_wins_a_disagreement_and_only_each_servers_latest_answer_counts() -> None:
    reach, clock = make()
    reach.record(Probe("s1", clock(), failed=("/ip4/1.2.3.4/tcp/1",)))
    reach.record(Probe("s2", clock(), ok=("/ip4/1.2.3.4/tcp/1",)))
    assert reach.state == PUBLIC and reach.confidence == 1
    clock.now += 1
    reach.record(Probe("s2", clock(), failed=("/ip4/1.2.3.4/tcp/1",)))  # s2 changed its mind
    assert reach.state == PRIVATE and reach.confidence == 2


def test_old_answers_expire_back_to_unknown() -> None:
    reach, clock = make()
    reach.record(Probe("s1", clock(), ok=("/ip4/1.2.3.4/tcp/1",)))
    clock.now += 61
    assert reach.expire() and reach.state == UNKNOWN and reach.snapshot()["probes"] == []


def test_observed_ips_are_most_recent_first_and_bounded() -> None:
    reach, clock = make()
    for i in range(20):
        clock.now += 1
        reach.saw(f"/ip4/198.51.100.{i}/tcp/5{i:03d}")
    assert len(reach.observed) <= 8
    assert reach.observed_ips()[0] == "198.51.100.19"


def test_snapshot_has_every_field_the_api_documents_and_drops_expired_relays() -> None:
    reach, clock = make()
    reach.reservations["r1"] = Reservation("r1", ("/ip4/198.51.100.10/tcp/4001/p2p/r1/p2p-circuit",), clock() + 30)
    reach.reservations["r2"] = Reservation("r2", ("/ip4/198.51.100.11/tcp/4001/p2p/r2/p2p-circuit",), clock() - 1)
    snap = reach.snapshot()
    assert set(snap) >= {"state", "confidence", "since", "last_check", "last_check_s_ago", "observed", "confirmed",
                         "relay_addrs", "relays", "mapped", "dht_mode", "relay_service", "hole_punching", "probes"}
    assert snap["relay_addrs"] == ["/ip4/198.51.100.10/tcp/4001/p2p/r1/p2p-circuit"]
    assert snap["last_check"] is None and snap["relays"][0]["expires_in_s"] == 30.0


def test_too_many_servers_keep_the_newest_answers() -> None:
    reach, clock = make()
    for i in range(12):
        clock.now += 1
        reach.record(Probe(f"s{i}", clock(), failed=("/ip4/1.2.3.4/tcp/1",)))
    assert len(reach.probes) == 8 and "s0" not in reach.probes and "s11" in reach.probes


def test_forgetting_a_lan_neighbours_public_answer_leaves_the_outside_verdict() -> None:
    # A peer on our side of the NAT reached our LAN address ("public"); the peer outside did not.
    reach, clock = make()
    reach.record(Probe("lan", clock(), ok=("/ip4/10.1.0.10/tcp/4001",)))
    reach.record(Probe("outside", clock(), failed=("/ip4/198.51.100.101/tcp/4001",)))
    assert reach.state == PUBLIC
    assert reach.forget(["lan", "never-asked"])
    assert reach.state == PRIVATE and reach.confirmed() == [] and list(reach.probes) == ["outside"]
    assert not reach.forget(["lan"])  # nothing left to forget: no change
