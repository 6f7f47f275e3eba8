"""Circuit relay v2, relay side ("hop"): reservations and relayed connections, within limits.

Why our own and not py-libp2p 0.8.1's ``CircuitV2Protocol(allow_hop=True)``, which works on the
happy path (measured: reserve, connect and relay between three hosts): it keys live circuits by
peer id, so when two peers are relayed to the same destination and one circuit ends, its cleanup
closes the other's streams; it has no bandwidth limit (``HopConfig.max_bandwidth_*`` is never
read); it keeps each reservation stream open and logs an error when the client closes it; and it
serves any libp2p peer. This relay uses the same protobufs and protocol id (so any circuit v2
client works with it), keeps one record per circuit, meters each circuit's bytes and rate and the
relay's total rate, and serves only peers that passed the hyphae hello (``admit``).

Limits (:class:`~.config.RelayLimitsConfig`): reservations in total and per IP, circuits in total
and per peer, and per circuit a duration, a byte budget (both directions together) and a rate
per direction; a circuit over its duration or budget is reset, as the spec says.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from ..errors import PeerError, ProtocolViolation
from ._relay_wire import close_quietly as _close
from ._relay_wire import reset_quietly as _reset
from ._relay_wire import (HOP_PROTOCOL_ID, STOP_PROTOCOL_ID, HopMessage, Limit, PbPeer, Reservation, StatusCode,
                          StopMessage, is_circuit, is_relayed_conn, peer_from, read_msg, write_msg)
from .config import RelayLimitsConfig

__all__ = ["RelayServer"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
MESSAGE_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
ADMIT_WAIT_S = 5.0


class _Bucket:
    """A token bucket holding one second of ``rate``; takers sleep off what they overdraw."""

    def __init__(self, rate_bytes_s: int) -> None:
        self.rate = rate_bytes_s
        self.tokens = float(rate_bytes_s)
        self.at = trio.current_time()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = trio.current_time()
        self.tokens = min(float(self.rate), self.tokens + (now - self.at) * self.rate) - n
        self.at = now
        if self.tokens < 0:
            await trio.sleep(-self.tokens / self.rate)


@dataclass
class _Slot:
    expires_at: float
    ip: str


@dataclass
class _Circuit:
    src: ID
    dst: ID
    budget: int | None
    failed: str = ""


class RelayServer:
    """The hop protocol of one host. :meth:`enable` registers it, :meth:`disable` stops new work.

    Args:
        host: the libp2p host.
        limits: what each reservation and circuit gets.
        admit: ``admit(peer_id)`` says whether a peer may use this relay (hyphae peers only).
        stats: a dict this server keeps current (shown by ``Host.reachability()``).
    """

    def __init__(self, host: IHost, limits: RelayLimitsConfig, *, admit: Callable[[str], bool],
                 stats: dict[str, Any]) -> None:
        self.host = host
        self.limits = limits
        self.admit = admit
        self.stats = stats
        self.enabled = False
        self._slots: dict[ID, _Slot] = {}
        self._per_peer: Counter[ID] = Counter()
        self._circuits = 0
        self._total = _Bucket(limits.total_rate_bytes_s)
        self._refused: Counter[str] = Counter()
        self._bytes = 0
        self._opened = 0
        self._publish()

    def enable(self) -> None:
        if not self.enabled:
            self.enabled = True
            self.host.set_stream_handler(TProtocol(HOP_PROTOCOL_ID), self.handle)
            log.info("relay service on (%d reservations, %d circuits, %s B/s per circuit)",
                     self.limits.max_reservations, self.limits.max_circuits, self.limits.circuit_rate_bytes_s)
        self._publish()

    def disable(self) -> None:
        """Refuse new reservations and circuits; the circuits running now run out their limits."""
        if self.enabled:
            self.enabled = False
            self.host.remove_stream_handler(TProtocol(HOP_PROTOCOL_ID))
            self._slots.clear()
            log.info("relay service off")
        self._publish()

    def forget(self, peer_id: str) -> None:
        """A peer disconnected: its reservation ends with its connection (as in go-libp2p)."""
        self._slots.pop(ID.from_base58(peer_id), None)
        self._publish()

    def _publish(self) -> None:
        now = time.time()
        self.stats.update(enabled=self.enabled, reservations=sum(1 for s in self._slots.values() if s.expires_at > now),
                          circuits=self._circuits, circuits_opened=self._opened, bytes_relayed=self._bytes,
                          refused=dict(self._refused), limits=vars(self.limits).copy())

    # ---- the hop stream --------------------------------------------------------------------

    async def handle(self, stream: INetStream) -> None:
        """One hop exchange: RESERVE (answer, close) or CONNECT (answer, then relay until done)."""
        peer = stream.muxed_conn.peer_id
        keep = False
        try:
            relayed = is_relayed_conn(stream.muxed_conn)
            if not self.enabled or relayed or not await self._admitted(peer.to_base58()):
                reason = "disabled" if not self.enabled else "relayed" if relayed else "unknown"
                self._refused[reason] += 1
                await self._status(stream, StatusCode.PERMISSION_DENIED)
                return
            message = await read_msg(stream, HopMessage, MESSAGE_TIMEOUT_S)
            if message.type == HopMessage.RESERVE:
                await self._reserve(stream, peer)
            elif message.type == HopMessage.CONNECT:
                keep = True
                await self._connect(stream, peer, peer_from(message.peer))
            else:
                await self._status(stream, StatusCode.UNEXPECTED_MESSAGE)
        except ProtocolViolation as exc:
            log.info("hop stream from %s violates the protocol: %s", peer, exc)
            self._refused["malformed"] += 1
            await self._status(stream, StatusCode.MALFORMED_MESSAGE)
        except PeerError as exc:
            log.debug("hop stream from %s: %s", peer, exc)
        finally:
            self._publish()
            if not keep:
                await _close(stream)

    async def _admitted(self, peer: str) -> bool:
        """Is ``peer`` a member? A peer that just connected may still be in its hello: wait a bit."""
        with trio.move_on_after(ADMIT_WAIT_S):
            while not self.admit(peer):
                if not self.host.get_network().get_connections(ID.from_base58(peer)):
                    return False
                await trio.sleep(0.05)
            return True
        return False

    async def _status(self, stream: INetStream, code: StatusCode, **fields: Any) -> None:
        try:
            await write_msg(stream, HopMessage(type=HopMessage.STATUS, status=int(code), **fields))
        except PeerError as exc:
            log.debug("could not send relay status %s: %s", code.name, exc)

    def _limit(self) -> Limit:
        return Limit(duration=int(self.limits.circuit_duration_s), data=int(self.limits.circuit_bytes))

    async def _reserve(self, stream: INetStream, peer: ID) -> None:
        now = time.time()
        for pid in [p for p, s in self._slots.items() if s.expires_at <= now]:
            del self._slots[pid]
        remote = stream.muxed_conn.get_remote_address()
        ip = remote[0] if remote else "?"
        if peer not in self._slots:
            if len(self._slots) >= self.limits.max_reservations:
                self._refused["reservations"] += 1
                await self._status(stream, StatusCode.RESERVATION_REFUSED)
                return
            if sum(1 for s in self._slots.values() if s.ip == ip) >= self.limits.max_reservations_per_ip:
                self._refused["reservations_per_ip"] += 1
                await self._status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
                return
        expires = int(now + self.limits.reservation_ttl_s)
        self._slots[peer] = _Slot(expires, ip)
        own = [a for a in self.host.get_addrs() if not is_circuit(a) and not str(a).startswith("/ip4/127.")]
        reservation = Reservation(expire=expires, addrs=[a.to_bytes() for a in own[:8]])
        await self._status(stream, StatusCode.OK, reservation=reservation, limit=self._limit())
        log.debug("reservation for %s until %d", peer, expires)

    async def _connect(self, stream: INetStream, src: ID, dst: ID) -> None:
        slot = self._slots.get(dst)
        if slot is None or slot.expires_at <= time.time() or not self.host.get_network().get_connections(dst):
            self._refused["no_reservation"] += 1
            await self._status(stream, StatusCode.NO_RESERVATION)
            await _close(stream)
            return
        lim = self.limits
        if (self._circuits >= lim.max_circuits or self._per_peer[src] >= lim.max_circuits_per_peer
                or self._per_peer[dst] >= lim.max_circuits_per_peer):
            self._refused["circuits"] += 1
            await self._status(stream, StatusCode.RESOURCE_LIMIT_EXCEEDED)
            await _close(stream)
            return
        self._circuits += 1
        self._per_peer[src] += 1
        self._per_peer[dst] += 1
        try:
            target = await self._open_stop(src, dst)
            if target is None:
                await self._status(stream, StatusCode.CONNECTION_FAILED)
                await _close(stream)
                return
            await self._status(stream, StatusCode.OK, limit=self._limit())
            self._opened += 1
            self._publish()
            await self._relay(stream, target, _Circuit(src, dst, lim.circuit_bytes or None))
        finally:
            self._circuits -= 1
            for pid in (src, dst):
                self._per_peer[pid] -= 1
                if self._per_peer[pid] <= 0:
                    del self._per_peer[pid]

    async def _open_stop(self, src: ID, dst: ID) -> INetStream | None:
        """Ask ``dst`` to accept the circuit (STOP CONNECT); its stream, or None if it refused."""
        target: INetStream | None = None
        try:
            with trio.fail_after(STOP_TIMEOUT_S):
                target = await self.host.new_stream(dst, [TProtocol(STOP_PROTOCOL_ID)])
            addrs = [a.to_bytes() for a in self.host.get_peerstore().addrs(src)[:4] if not is_circuit(a)]
            await write_msg(target, StopMessage(type=StopMessage.CONNECT, peer=PbPeer(id=src.to_bytes(), addrs=addrs),
                                                limit=self._limit()))
            answer = await read_msg(target, StopMessage, STOP_TIMEOUT_S)
            if answer.type == StopMessage.STATUS and answer.status == StatusCode.OK:
                return target
            log.debug("%s refused a relayed connection from %s (status %s)", dst, src, answer.status)
        except (PeerError, ProtocolViolation, trio.TooSlowError) as exc:
            log.debug("STOP to %s failed: %s", dst, exc)
        except Exception as exc:  # noqa: BLE001 — libp2p raises its own hierarchy on dial/stream
            log.debug("STOP to %s failed: %s", dst, exc)
        if target is not None:
            await _reset(target)
        return None

    async def _relay(self, a: INetStream, b: INetStream, circuit: _Circuit) -> None:
        """Copy both ways until both sides finished, a limit is hit, or one side breaks."""
        duration = self.limits.circuit_duration_s
        with trio.move_on_after(duration if duration > 0 else float("inf")) as deadline:
            async with trio.open_nursery() as nursery:
                for src, dst in ((a, b), (b, a)):
                    nursery.start_soon(self._pump, src, dst, circuit, _Bucket(self.limits.circuit_rate_bytes_s),
                                       nursery.cancel_scope)
        if deadline.cancelled_caught:
            circuit.failed = circuit.failed or "duration"
        if circuit.failed:
            log.info("relayed connection %s -> %s reset: %s", circuit.src, circuit.dst, circuit.failed)
            self._refused[f"reset_{circuit.failed}"] += 1
            await _reset(a)
            await _reset(b)
        else:
            await _close(a)
            await _close(b)

    async def _pump(self, src: INetStream, dst: INetStream, circuit: _Circuit, bucket: _Bucket,
                    scope: trio.CancelScope) -> None:
        try:
            while True:
                try:
                    data = await src.read(CHUNK_BYTES)
                except EOFError:  # StreamEOF: the sender half-closed
                    data = b""
                if not data:
                    await dst.close()  # half-close: the other direction may go on
                    return
                if circuit.budget is not None:
                    circuit.budget -= len(data)
                    if circuit.budget < 0:
                        circuit.failed = "data"
                        scope.cancel()
                        return
                await bucket.take(len(data))
                await self._total.take(len(data))
                await dst.write(data)
                self._bytes += len(data)
                self.stats["bytes_relayed"] = self._bytes  # live: the rest is published per circuit
        except Exception as exc:  # noqa: BLE001 — a reset or broken side ends the circuit
            circuit.failed = circuit.failed or "broken"
            log.debug("relayed connection %s -> %s: %s", circuit.src, circuit.dst, exc)
            scope.cancel()
