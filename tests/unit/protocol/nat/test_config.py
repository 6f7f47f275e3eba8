"""NAT settings: defaults valid, bad values refused with what to fix, TOML tables accepted."""

import pytest

from hyphae.protocol.config import HostConfig
from hyphae.protocol.errors import ConfigError
from hyphae.protocol.nat import NatConfig, RelayLimitsConfig

RELAY = "/ip4/198.51.100.10/tcp/4001/p2p/12D3KooWEKNUC8Jm9GdhVLi4rygDH8NrnDzq7vcJNcJi9E9z4iym"


def test_defaults_are_valid_and_nested_in_the_host_config() -> None:
    assert HostConfig().nat == NatConfig()


def test_a_toml_table_becomes_a_nat_config() -> None:
    config = HostConfig(nat={"relay_client": "on", "relays": [RELAY], "relay_limits": {"circuit_bytes": 1024}})
    assert config.nat.relay_client == "on" and config.nat.relays == (RELAY,)
    assert config.nat.relay_limits == RelayLimitsConfig(circuit_bytes=1024)


@pytest.mark.parametrize(("table", "match"), [
    ({"bogus": 1}, "unknown setting"),
    ({"relay_service": "sometimes"}, "relay_service must be one of"),
    ({"relay_reservations": 9}, "relay_reservations must be 0-8"),
    ({"autonat_interval_s": 1}, "autonat_interval_s must be 5-86400"),
    ({"relays": ["/ip4/1.2.3.4/tcp/1"]}, "lacks the peer id"),
    ({"relay_limits": {"max_circuits": 0}}, "max_circuits must be an int >= 1"),
    ({"relay_limits": {"circuit_bytes": -1}}, "circuit_bytes must be a number >= 0"),
    ({"relay_limits": {"reservation_ttl_s": 1}}, "reservation_ttl_s must be >= 10"),
    ({"relay_limits": {"nope": 1}}, "unknown setting"),
])
def test_bad_values_say_what_to_fix(table: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        HostConfig(nat=table)
