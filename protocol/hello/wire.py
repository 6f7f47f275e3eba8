"""Wire format of ``/hyphae/hello/1``: one framed msgpack map each way, nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ProtocolViolation
from ..wire import expect_map

__all__ = ["PROTOCOL_ID", "MAX_FRAME_BYTES", "Hello"]

PROTOCOL_ID = "/hyphae/hello/1"
MAX_FRAME_BYTES = 16 * 1024
WIRE_VERSION = 1

_MAX_AGENT = 128
_MAX_NETWORK = 64
_MAX_ROLES = 8
_MAX_ROLE = 32
_MAX_ADDRS = 16
_MAX_ADDR = 256
_MAX_PROOF = 64


@dataclass(frozen=True)
class Hello:
    """What a node says about itself when it meets another."""

    agent: str
    network: str
    roles: tuple[str, ...] = ()
    listen: tuple[str, ...] = field(default=())
    proof: bytes = b""
    """Proof of a closed run's secret, made for the one receiver (:mod:`..admission`)."""

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "v": WIRE_VERSION,
            "agent": self.agent,
            "network": self.network,
            "roles": list(self.roles),
            "listen": list(self.listen)[:_MAX_ADDRS],
        }
        if self.proof:
            wire["proof"] = self.proof
        return wire

    @classmethod
    def from_wire(cls, message: Any) -> Hello:
        """Validate and convert a decoded message.

        Raises:
            ProtocolViolation: wrong version, unknown field, wrong type or a bound exceeded.
        """
        m = expect_map(message, {"v": int, "agent": str, "network": str, "roles": list, "listen": list},
                       {"proof": bytes}, what="hello")
        if m["v"] != WIRE_VERSION:
            raise ProtocolViolation(f"hello version {m['v']} is not supported (this node speaks {WIRE_VERSION})")
        _bounded_str(m["agent"], _MAX_AGENT, "agent")
        _bounded_str(m["network"], _MAX_NETWORK, "network")
        roles = _bounded_list(m["roles"], _MAX_ROLES, _MAX_ROLE, "roles")
        listen = _bounded_list(m["listen"], _MAX_ADDRS, _MAX_ADDR, "listen")
        proof = m.get("proof", b"")
        if len(proof) > _MAX_PROOF:
            raise ProtocolViolation(f"hello proof is {len(proof)} bytes, limit {_MAX_PROOF}")
        return cls(agent=m["agent"], network=m["network"], roles=roles, listen=listen, proof=proof)


def _bounded_str(value: str, limit: int, name: str) -> None:
    if len(value) > limit:
        raise ProtocolViolation(f"hello {name} is {len(value)} chars, limit {limit}")


def _bounded_list(value: list[Any], max_items: int, max_len: int, name: str) -> tuple[str, ...]:
    if len(value) > max_items:
        raise ProtocolViolation(f"hello {name} has {len(value)} entries, limit {max_items}")
    for item in value:
        if not isinstance(item, str):
            raise ProtocolViolation(f"hello {name} entries must be strings, got {type(item).__name__}")
        _bounded_str(item, max_len, f"{name} entry")
    return tuple(value)
