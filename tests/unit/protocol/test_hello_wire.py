"""The hello message: exact schema, bounded sizes."""

import pytest

from hyphae.protocol.errors import ProtocolViolation
from hyphae.protocol.hello.wire import Hello


def test_hello_round_trips() -> None:
    h = Hello(agent="hyphae/0.1.0", network="hyphae", roles=("trainer",), listen=("/ip4/1.2.3.4/tcp/1",))
    assert Hello.from_wire(h.to_wire()) == h


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"v": 2}, "version 2"),
        ({"agent": "x" * 129}, "agent is 129 chars"),
        ({"roles": ["r"] * 9}, "roles has 9 entries"),
        ({"listen": [1]}, "entries must be strings"),
        ({"extra": 1}, "unknown field"),
        ({"network": 5}, "must be str"),
    ],
)
def test_bad_hellos_are_refused(change: dict, match: str) -> None:
    msg = Hello(agent="a", network="n").to_wire()
    msg.update(change)
    with pytest.raises(ProtocolViolation, match=match):
        Hello.from_wire(msg)
