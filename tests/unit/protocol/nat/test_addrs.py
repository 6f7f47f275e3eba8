"""What a host advertises (listen, confirmed, relay addresses) and how dials race the relay."""

import multiaddr
import trio

from hyphae.protocol.nat import addrs as nat_addrs
from hyphae.protocol.nat.addrs import advertised, dial_any, install_get_addrs

RELAY = "12D3KooWEKNUC8Jm9GdhVLi4rygDH8NrnDzq7vcJNcJi9E9z4iym"
ME = "12D3KooWGzkZuUWYu32uvHfZjWDEBW12Y37LBPB8RiatM3imrTPe"
M = multiaddr.Multiaddr


def run(test, timeout_s: float = 20.0) -> None:
    """Trio tests as plain functions under a deadline (pytest-asyncio would run them on asyncio)."""
    async def main() -> None:
        with trio.fail_after(timeout_s):
            await test()

    trio.run(main)


def local(monkeypatch, ips: list[str]) -> None:
    monkeypatch.setattr(nat_addrs, "interface_ipv4s", lambda: ips)
    monkeypatch.setattr(nat_addrs, "_local_cache", (-1e9, frozenset()))
    monkeypatch.setattr("hyphae.protocol._addrs.interface_ipv4s", lambda: ips)


def test_observed_addresses_are_not_advertised_and_loopback_comes_last(monkeypatch) -> None:
    local(monkeypatch, ["127.0.0.1", "10.1.0.10"])
    candidates = [M("/ip4/0.0.0.0/tcp/4001"), M("/ip4/198.51.100.101/tcp/53000")]  # the second was observed
    assert [str(a) for a in advertised(candidates, announce=[], extra=list)] == [
        "/ip4/10.1.0.10/tcp/4001", "/ip4/127.0.0.1/tcp/4001"]


def test_confirmed_and_relay_addresses_are_added_once() -> None:
    extra = [M(f"/ip4/198.51.100.10/tcp/4001/p2p/{RELAY}/p2p-circuit"), M("/ip4/203.0.113.5/tcp/4001")]
    got = advertised([M("/ip4/203.0.113.5/tcp/4001")], announce=[M("/ip4/203.0.113.5/tcp/4001")],
                     extra=lambda: extra)
    assert [str(a) for a in got] == ["/ip4/203.0.113.5/tcp/4001", str(extra[0])]


def test_a_failing_extra_source_never_breaks_advertising(monkeypatch) -> None:
    local(monkeypatch, ["10.1.0.10"])

    def broken() -> list:
        raise RuntimeError("boom")

    assert advertised([M("/ip4/10.1.0.10/tcp/1")], announce=[], extra=broken) == [M("/ip4/10.1.0.10/tcp/1")]


def test_get_addrs_keeps_circuit_addresses_whole(monkeypatch) -> None:
    # py-libp2p's get_addrs strips from the first /p2p/ on: the relay's id would eat the circuit.
    local(monkeypatch, ["10.1.0.10"])

    class FakeHost:
        def get_id(self) -> str:
            return ME

        def get_transport_addrs(self) -> list:
            return [M("/ip4/10.1.0.10/tcp/4001")]

    host = FakeHost()
    circuit = M(f"/ip4/198.51.100.10/tcp/4001/p2p/{RELAY}/p2p-circuit")
    install_get_addrs(host, announce=[], extra=lambda: [circuit])
    assert [str(a) for a in host.get_addrs()] == [f"/ip4/10.1.0.10/tcp/4001/p2p/{ME}", f"{circuit}/p2p/{ME}"]


async def _direct_wins_when_it_works_and_the_relay_is_never_tried() -> None:
    tried: list[str] = []

    async def direct(addrs: list) -> None:
        tried.append("direct")

    async def relayed(addr: object) -> None:
        tried.append("relay")

    addrs = [M("/ip4/10.1.0.10/tcp/4001"), M(f"/ip4/198.51.100.10/tcp/4001/p2p/{RELAY}/p2p-circuit")]
    assert await dial_any(ME, addrs, direct=direct, relayed=relayed, timeout_s=5)
    assert tried == ["direct"]


async def _relay_starts_at_once_when_direct_fails_and_after_a_head_start_when_it_hangs() -> None:
    circuit = M(f"/ip4/198.51.100.10/tcp/4001/p2p/{RELAY}/p2p-circuit")
    started: list[float] = []

    async def failing(addrs: list) -> None:
        raise OSError("unreachable")

    async def hanging(addrs: list) -> None:
        await trio.sleep_forever()

    async def relayed(addr: object) -> None:
        started.append(trio.current_time())

    t0 = trio.current_time()
    assert await dial_any(ME, [M("/ip4/10.1.0.10/tcp/1"), circuit], direct=failing, relayed=relayed, timeout_s=5)
    assert started[-1] - t0 < 0.5
    t0 = trio.current_time()
    assert await dial_any(ME, [M("/ip4/10.1.0.10/tcp/1"), circuit], direct=hanging, relayed=relayed, timeout_s=5)
    assert nat_addrs.RELAY_HEAD_START_S - 0.05 <= started[-1] - t0 < nat_addrs.RELAY_HEAD_START_S + 0.5


async def _everything_failing_is_false_not_an_exception() -> None:
    async def failing(*_: object) -> None:
        raise OSError("no")

    assert not await dial_any(ME, [M("/ip4/10.1.0.10/tcp/1")], direct=failing, relayed=failing, timeout_s=1)


def test_direct_wins_when_it_works_and_the_relay_is_never_tried() -> None:
    run(_direct_wins_when_it_works_and_the_relay_is_never_tried)


def test_relay_starts_at_once_when_direct_fails_and_after_a_head_start_when_it_hangs() -> None:
    run(_relay_starts_at_once_when_direct_fails_and_after_a_head_start_when_it_hangs)


def test_everything_failing_is_false_not_an_exception() -> None:
    run(_everything_failing_is_false_not_an_exception)

