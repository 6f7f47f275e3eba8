"""Dial-back wire messages and what a server agrees to dial: untrusted input, nothing else."""

import pytest

from hyphae.protocol.errors import ProtocolViolation
from hyphae.protocol.nat.autonat import (MAX_ADDRS, MAX_TARGETS, dial_targets, parse_reply, parse_request,
                                         request_to_wire)


def test_request_round_trips_and_is_capped() -> None:
    addrs = [f"/ip4/10.0.0.1/tcp/{4000 + i}" for i in range(20)]
    assert parse_request(request_to_wire(addrs)) == addrs[:MAX_ADDRS]


@pytest.mark.parametrize("message", [
    [],
    {"v": 1},
    {"v": 2, "addrs": []},
    {"v": True, "addrs": []},
    {"v": 1, "addrs": [], "extra": 1},
    {"v": 1, "addrs": [1]},
    {"v": 1, "addrs": ["x" * 300]},
    {"v": 1, "addrs": ["/ip4/1.2.3.4/tcp/1"] * (MAX_ADDRS + 1)},
])
def test_malformed_requests_are_protocol_violations(message: object) -> None:
    with pytest.raises(ProtocolViolation):
        parse_request(message)


def test_reply_parsing_checks_types_and_sizes() -> None:
    reply = {"v": 1, "observed": "/ip4/198.51.100.101/tcp/5555", "ok": [], "failed": ["/ip4/198.51.100.101/tcp/4001"]}
    assert parse_reply(reply) == ("/ip4/198.51.100.101/tcp/5555", [], ["/ip4/198.51.100.101/tcp/4001"], "")
    assert parse_reply({**reply, "refused": "rate"})[3] == "rate"
    with pytest.raises(ProtocolViolation):
        parse_reply({**reply, "observed": "x" * 1000})
    with pytest.raises(ProtocolViolation):
        parse_reply({**reply, "ok": "not a list"})


def test_server_dials_only_the_observed_ip_at_the_listed_ports() -> None:
    # A requester cannot aim the dial-back at a third party: only its own (observed) IP is used.
    listed = ["/ip4/203.0.113.7/tcp/4001", "/ip4/10.1.0.10/tcp/4001", "/ip4/10.1.0.10/tcp/4002",
              "/dns4/example.org/tcp/80", "/ip4/1.2.3.4/udp/9"]
    assert dial_targets("198.51.100.101", listed) == ["/ip4/198.51.100.101/tcp/4001", "/ip4/198.51.100.101/tcp/4002",
                                                      "/ip4/198.51.100.101/tcp/80"]
    many = [f"/ip4/10.0.0.1/tcp/{p}" for p in range(5000, 5010)]
    assert len(dial_targets("198.51.100.101", many)) == MAX_TARGETS
    assert dial_targets("2001:db8::1", ["/ip6/2001:db8::9/tcp/4001"]) == ["/ip6/2001:db8::1/tcp/4001"]
    assert dial_targets("198.51.100.1", ["/ip4/1.2.3.4/tcp/0", "/ip4/1.2.3.4/tcp/70000"]) == []
