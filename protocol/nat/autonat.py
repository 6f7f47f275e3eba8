"""``/hyphae/autonat/1``: "dial me back" done right — a fresh connection from another identity.

Why not py-libp2p 0.8.1's AutoNAT: its server answers a dial request by dialing through the
host's swarm, which hands back the connection the requester already has open, so every address
looks dialable — closed ports included (measured; DESIGN.md). Here the server dials from a
separate libp2p host with a throwaway identity (:class:`DialBack`) that never has a connection to
anyone: each dial-back is a new TCP connection from a new source port, and it counts only if the
Noise handshake proves the requester's identity at the other end.

Rules that keep it from being abused or fooled:

* the server dials only the IP address it sees the request come from, at the ports the
  requester lists (so it cannot be aimed at a third party), at most ``MAX_TARGETS`` of them;
* requests over a relayed connection are refused (the server cannot see the requester's IP);
* one request per peer per ``PER_PEER_INTERVAL_S``, ``MAX_CONCURRENT`` at a time;
* the messages are one msgpack map each way, schema-checked, 4 KiB at most.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from typing import Any

import multiaddr
import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ..errors import EndOfStream, PeerError, ProtocolViolation
from ..stream import TrioFramedStream, libp2p_errors_as_peer_errors
from ..wire import expect_map
from ._relay_wire import is_relayed_conn
from .reachability import Probe

__all__ = ["PROTOCOL_ID", "AutoNatServer", "DialBack", "probe", "request_to_wire", "parse_request",
           "parse_reply", "dial_targets"]

log = logging.getLogger(__name__)

PROTOCOL_ID = "/hyphae/autonat/1"
WIRE_VERSION = 1
MAX_FRAME_BYTES = 4096
MAX_ADDRS = 8
MAX_ADDR_CHARS = 256
MAX_TARGETS = 4
MAX_CONCURRENT = 4
PER_PEER_INTERVAL_S = 10.0
DIAL_TIMEOUT_S = 4.0
REQUEST_TIMEOUT_S = 4 * DIAL_TIMEOUT_S + 5.0


# ---- wire ----------------------------------------------------------------------------------------

def request_to_wire(addrs: list[str]) -> dict[str, Any]:
    return {"v": WIRE_VERSION, "addrs": addrs[:MAX_ADDRS]}


def parse_request(message: Any) -> list[str]:
    """The addresses a dial-back request lists. Raises ProtocolViolation on anything else."""
    m = expect_map(message, {"v": int, "addrs": list}, what="autonat request")
    if m["v"] != WIRE_VERSION:
        raise ProtocolViolation(f"autonat version {m['v']} is not supported (this node speaks {WIRE_VERSION})")
    return _addr_list(m["addrs"], "addrs")


def parse_reply(message: Any) -> tuple[str, list[str], list[str], str]:
    """(observed, ok, failed, refused) of a reply. Raises ProtocolViolation on anything else."""
    m = expect_map(message, {"v": int, "observed": str, "ok": list, "failed": list}, {"refused": str},
                   what="autonat reply")
    if m["v"] != WIRE_VERSION:
        raise ProtocolViolation(f"autonat version {m['v']} is not supported (this node speaks {WIRE_VERSION})")
    if len(m["observed"]) > MAX_ADDR_CHARS or len(m.get("refused", "")) > MAX_ADDR_CHARS:
        raise ProtocolViolation("autonat reply field too long")
    return m["observed"], _addr_list(m["ok"], "ok"), _addr_list(m["failed"], "failed"), m.get("refused", "")


def _addr_list(value: list[Any], name: str) -> list[str]:
    if len(value) > MAX_ADDRS:
        raise ProtocolViolation(f"autonat {name} lists {len(value)} addresses, limit {MAX_ADDRS}")
    for item in value:
        if not isinstance(item, str) or len(item) > MAX_ADDR_CHARS:
            raise ProtocolViolation(f"autonat {name} entries must be strings of <= {MAX_ADDR_CHARS} characters")
    return list(value)


def dial_targets(observed_ip: str, addrs: list[str]) -> list[str]:
    """The addresses a server dials: the requester's observed IP at each TCP port it listed."""
    ip = ipaddress.ip_address(observed_ip)
    family = "ip4" if ip.version == 4 else "ip6"
    ports: list[int] = []
    for text in addrs:
        parts = text.split("/")
        if len(parts) >= 5 and parts[3] == "tcp" and parts[4].isdigit() and 0 < int(parts[4]) < 65536:
            if int(parts[4]) not in ports:
                ports.append(int(parts[4]))
    return [f"/{family}/{ip}/tcp/{port}" for port in ports[:MAX_TARGETS]]


# ---- server --------------------------------------------------------------------------------------

class DialBack:
    """A libp2p host with a throwaway identity that only ever dials out, one fresh dial at a time.

    Args:
        build: ``build(listen_addrs) -> IHost`` (hyphae's host builder: Noise + yamux only).
    """

    def __init__(self, build: Callable[[list[multiaddr.Multiaddr]], IHost]) -> None:
        self._build = build
        self.host: IHost | None = None
        self._ready = trio.Event()

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        self.host = self._build([])
        async with self.host.run([]):
            self._ready.set()
            task_status.started()
            await trio.sleep_forever()

    async def dial(self, peer: ID, addr: str, timeout_s: float = DIAL_TIMEOUT_S) -> bool:
        """True if a new connection to ``addr`` reached ``peer`` (proved by its Noise key)."""
        await self._ready.wait()
        network = self.host.get_network()
        with trio.move_on_after(timeout_s):
            try:
                conn = await network.dial_addr(multiaddr.Multiaddr(addr), peer)
            except Exception as exc:  # noqa: BLE001 — every failure means "not reachable there"
                log.debug("dial-back of %s at %s failed: %s", peer, addr, exc)
                return False
            try:
                return conn.muxed_conn.peer_id == peer
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(2):
                    try:
                        await conn.close()
                    except Exception:  # noqa: BLE001
                        pass
        return False

    async def hang_up(self, peer: ID) -> None:
        """Close every connection to ``peer``. Needed after concurrent dials: when two of them
        reach the peer, py-libp2p keeps one muxed connection for both and closing the duplicate
        wrapper leaves it open, so the checked node kept a stranger connected."""
        if self.host is None:
            return
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            try:
                await self.host.get_network().close_peer(peer)
            except Exception as exc:  # noqa: BLE001 — already gone is fine
                log.debug("hang up on %s: %s", peer, exc)


class AutoNatServer:
    """Answers dial-back requests (register :meth:`handle` for :data:`PROTOCOL_ID`)."""

    def __init__(self, dialback: DialBack, *, admit: Callable[[str], bool]) -> None:
        self.dialback = dialback
        self.admit = admit
        self._limiter = trio.CapacityLimiter(MAX_CONCURRENT)
        self._last: dict[str, float] = {}
        self.stats: dict[str, int] = {"answered": 0, "refused": 0}

    async def handle(self, raw: INetStream) -> None:
        stream = TrioFramedStream(raw, max_frame_bytes=MAX_FRAME_BYTES)
        peer = stream.peer_id
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                addrs = parse_request(await stream.recv())
                reply = await self._answer(raw, peer, addrs)
                await stream.send(reply)
        except ProtocolViolation as exc:
            log.info("autonat request from %s violates the protocol: %s", peer, exc)
            await stream.reset()
            return
        except (PeerError, trio.TooSlowError) as exc:
            log.debug("autonat request from %s: %s", peer, exc)
            await stream.reset()
            return
        await stream.close()

    async def _answer(self, raw: INetStream, peer: str, addrs: list[str]) -> dict[str, Any]:
        remote = raw.muxed_conn.get_remote_address()
        observed = "" if remote is None else str(remote[0])
        reply: dict[str, Any] = {"v": WIRE_VERSION, "observed": "", "ok": [], "failed": []}
        refused = ""
        if is_relayed_conn(raw.muxed_conn) or not observed:
            refused = "request came over a relayed connection; cannot see its address"
        elif not self.admit(peer):
            refused = "not a member of this network"
        elif time.monotonic() - self._last.get(peer, -1e9) < PER_PEER_INTERVAL_S:
            refused = f"one request per {PER_PEER_INTERVAL_S:.0f} s"
        if refused:
            self.stats["refused"] += 1
            return {**reply, "refused": refused}
        family = "ip6" if ":" in observed else "ip4"
        reply["observed"] = f"/{family}/{observed}/tcp/{remote[1]}"
        targets = dial_targets(observed, addrs)
        if not targets:
            self.stats["refused"] += 1
            return {**reply, "refused": "no TCP address to dial"}
        self._last[peer] = time.monotonic()
        if len(self._last) > 4096:
            del self._last[min(self._last, key=self._last.__getitem__)]
        pid = ID.from_base58(peer)
        async with self._limiter:
            results: dict[str, bool] = {}

            async def one(addr: str) -> None:
                results[addr] = await self.dialback.dial(pid, addr)

            try:
                async with trio.open_nursery() as nursery:
                    for addr in targets:
                        nursery.start_soon(one, addr)
            finally:
                await self.dialback.hang_up(pid)
        reply["ok"] = [a for a in targets if results.get(a)]
        reply["failed"] = [a for a in targets if not results.get(a)]
        self.stats["answered"] += 1
        log.debug("autonat for %s: ok %s, failed %s", peer, reply["ok"], reply["failed"])
        return reply


# ---- client --------------------------------------------------------------------------------------

async def probe(host: IHost, server: str, addrs: list[str], *, timeout_s: float = REQUEST_TIMEOUT_S) -> Probe:
    """Ask ``server`` to dial us back at ``addrs``; the answer (or why there is none) as a Probe."""
    now = time.time()
    framed: TrioFramedStream | None = None
    try:
        with trio.fail_after(timeout_s):
            with libp2p_errors_as_peer_errors(f"cannot open {PROTOCOL_ID} to {server}"):
                raw = await host.new_stream(ID.from_base58(server), [TProtocol(PROTOCOL_ID)])
            framed = TrioFramedStream(raw, max_frame_bytes=MAX_FRAME_BYTES)
            observed, ok, failed, refused = parse_reply(await framed.request(request_to_wire(addrs)))
    except (PeerError, EndOfStream) as exc:
        return Probe(server, now, refused=f"no answer: {exc}"[:200])
    except ProtocolViolation as exc:
        log.info("autonat reply from %s violates the protocol: %s", server, exc)
        return Probe(server, now, refused=f"bad answer: {exc}"[:200])
    except trio.TooSlowError:
        return Probe(server, now, refused=f"no answer within {timeout_s:.0f} s")
    finally:
        if framed is not None:
            await framed.close()
    return Probe(server, time.time(), tuple(ok), tuple(failed), observed or None, refused)
