"""UPnP port mapping against a fake miniupnpc: mapped, remapped, absent, and removed on exit."""

import trio

from hyphae.protocol.nat.upnp import UpnpMapper


class FakeIGD:
    def __init__(self, *, devices: int = 1, taken: set[int] | None = None) -> None:
        self.devices = devices
        self.taken = taken or set()
        self.mappings: dict[int, int] = {}
        self.discoverdelay = 0
        self.lanaddr = "192.168.1.20"

    def discover(self) -> int:
        return self.devices

    def selectigd(self) -> None:
        if not self.devices:
            raise Exception("No UPnP device discovered")

    def externalipaddress(self) -> str:
        return "203.0.113.9"

    def addportmapping(self, eport: int, proto: str, host: str, iport: int, desc: str, remote: str, lease: int) -> bool:
        if eport in self.taken:
            raise Exception("ConflictInMappingEntry")
        self.mappings[eport] = iport
        return True

    def addanyportmapping(self, eport: int, proto: str, host: str, iport: int, desc: str, remote: str,
                          lease: int) -> int:
        port = 50000 + len(self.mappings)
        self.mappings[port] = iport
        return port

    def deleteportmapping(self, eport: int, proto: str) -> bool:
        self.mappings.pop(eport, None)
        return True


class FakeModule:
    def __init__(self, igd: FakeIGD) -> None:
        self.igd = igd

    def UPnP(self) -> FakeIGD:  # noqa: N802 — miniupnpc's name
        return self.igd


def run_mapper(mapper: UpnpMapper, ports: list[int], changes: list[int]) -> None:
    async def main() -> None:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(mapper.run, ports, lambda: changes.append(1))
                while not mapper.mappings and mapper.status in ("not tried",):
                    await trio.sleep(0.01)
                await trio.sleep(0.05)
                nursery.cancel_scope.cancel()

    trio.run(main)


def test_maps_the_listen_port_and_removes_it_on_exit() -> None:
    igd = FakeIGD()
    mapper, changes = UpnpMapper(100, module=FakeModule(igd)), []
    run_mapper(mapper, [4001], changes)
    assert [m.multiaddr for m in mapper.mappings] == ["/ip4/203.0.113.9/tcp/4001"] and changes
    assert mapper.mappings[0].to_json()["internal"] == "192.168.1.20:4001"
    assert igd.mappings == {}  # removed when the host stopped


def test_a_taken_port_gets_whatever_port_the_router_picks() -> None:
    igd = FakeIGD(taken={4001})
    mapper = UpnpMapper(100, module=FakeModule(igd))
    run_mapper(mapper, [4001], [])
    assert mapper.mappings[0].external_port == 50000 and mapper.mappings[0].internal_port == 4001


def test_no_gateway_means_nothing_mapped_and_a_status_that_says_so() -> None:
    mapper, changes = UpnpMapper(100, module=FakeModule(FakeIGD(devices=0))), []
    run_mapper(mapper, [4001], changes)
    assert mapper.mappings == [] and not changes and "no UPnP gateway" in mapper.status
