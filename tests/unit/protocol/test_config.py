"""Host configuration: every invalid value is refused with what to fix."""

import pytest

from hyphae.protocol.config import HostConfig, parse_peer_multiaddr
from hyphae.protocol.errors import ConfigError

PEER = "12D3KooWEKNUC8Jm9GdhVLi4rygDH8NrnDzq7vcJNcJi9E9z4iym"


def test_defaults_are_valid() -> None:
    HostConfig()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"listen": ("nonsense",)}, "is not a multiaddr"),
        ({"listen": ("/ip4/1.2.3.4/udp/5",)}, "is not TCP"),
        ({"listen": ()}, "at least one"),
        ({"bootstrap": ("/ip4/1.2.3.4/tcp/5",)}, "lacks the peer id"),
        ({"dht_mode": "both"}, "dht_mode must be one of"),
        ({"network": "has space"}, "network must be"),
        ({"target_peers": 0}, "target_peers must be between 1"),
        ({"target_peers": 100, "max_connections": 50}, "target_peers must be between 1"),
        ({"ping_interval_s": 0}, "ping_interval_s must be > 0"),
        ({"hello_deadline_s": 0}, "hello_deadline_s must be in \\(0, 60\\]"),
        ({"hello_deadline_s": 600}, "hello_deadline_s must be in \\(0, 60\\]"),
        ({"hello_deadline_s": "3"}, "hello_deadline_s must be int or float"),
        # wrong types, as a TOML file can give them (found by the config fuzzer: name = [0])
        ({"network": [0]}, "network must be str, got \\[0\\]"),
        ({"mdns": "yes"}, "mdns must be bool"),
        ({"target_peers": True}, "target_peers must be int"),
        ({"dial_timeout_s": "5"}, "dial_timeout_s must be int or float"),
        ({"listen": "/ip4/0.0.0.0/tcp/0"}, "listen must be a list of multiaddr strings"),
        ({"bootstrap": (5,)}, "bootstrap must be a list of multiaddr strings"),
    ],
)
def test_invalid_values_say_what_to_fix(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HostConfig(**kwargs)


def test_peer_multiaddr_splits_into_id_and_transport() -> None:
    peer, addr = parse_peer_multiaddr(f"/ip4/127.0.0.1/tcp/4101/p2p/{PEER}", what="bootstrap")
    assert peer == PEER and str(addr) == "/ip4/127.0.0.1/tcp/4101"
