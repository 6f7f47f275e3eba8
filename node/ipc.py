"""Daemon <-> worker IPC: typed dataclass messages as msgpack frames over a local socket.

Only small metadata crosses the socket; tensors travel in shared memory (:mod:`.shm`) and a
message names the segment and where each tensor lies in it. Nothing is pickled: each message
type declares its fields and :func:`decode` checks them, so a confused or compromised worker
cannot make the daemon build arbitrary objects.
"""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hyphae.protocol.errors import EndOfStream, ProtocolViolation
from hyphae.protocol.wire import HEADER_BYTES, decode_body, encode_frame, parse_header

__all__ = [
    "TensorRef", "WorkerHello", "Setup", "Call", "Reply", "Progress", "Release", "Stop",
    "Message", "send", "recv", "MAX_FRAME_BYTES",
]

MAX_FRAME_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorRef:
    """Where one named tensor lies in a shared-memory segment."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_wire(self) -> list[Any]:
        return [self.name, self.dtype, list(self.shape), self.offset, self.nbytes]

    @classmethod
    def from_wire(cls, item: Any) -> TensorRef:
        if not (isinstance(item, list) and len(item) == 5):
            raise ProtocolViolation(f"tensor ref must be a 5-item list, got {item!r:.80}")
        name, dtype, shape, offset, nbytes = item
        if not (isinstance(name, str) and isinstance(dtype, str) and isinstance(shape, list)
                and all(isinstance(d, int) and d >= 0 for d in shape)
                and isinstance(offset, int) and offset >= 0 and isinstance(nbytes, int) and nbytes >= 0):
            raise ProtocolViolation(f"malformed tensor ref {item!r:.80}")
        return cls(name, dtype, tuple(shape), offset, nbytes)


@dataclass(frozen=True)
class Message:
    """Base: subclasses list their wire tag in ``TAG``; fields must be plain msgpack data."""

    TAG: ClassVar[str] = ""


@dataclass(frozen=True)
class WorkerHello(Message):
    TAG: ClassVar[str] = "hello"
    index: int
    pid: int


@dataclass(frozen=True)
class Setup(Message):
    """What the worker should train; sent once after its hello."""

    TAG: ClassVar[str] = "setup"
    peer_id: str
    preset: str
    algorithm: str
    algorithm_config: dict[str, Any]
    max_steps: int
    seed: int
    data: str
    cache_dir: str
    checkpoint_dir: str
    device: str
    batch_size: int
    seq_len: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    init_from: str = ""


@dataclass(frozen=True)
class Call(Message):
    """A Comm method call from the worker; tensors (if any) are in segment ``shm``."""

    TAG: ClassVar[str] = "call"
    id: int
    method: str
    args: dict[str, Any]
    shm: str = ""
    tensors: list[TensorRef] = field(default_factory=list)


@dataclass(frozen=True)
class Reply(Message):
    """The answer to :class:`Call` ``id``; ``error`` is ``{"kind", "message", "peer"}`` or empty."""

    TAG: ClassVar[str] = "reply"
    id: int
    result: Any = None
    shm: str = ""
    tensors: list[TensorRef] = field(default_factory=list)
    error: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress(Message):
    """Training progress from the worker: a log line, an eval, a checkpoint, or the end."""

    TAG: ClassVar[str] = "progress"
    kind: str
    step: int
    tokens: int
    elapsed_s: float
    loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    checkpoint: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    """The algorithm's own numbers (outer step, peers averaged, gossips, ZO hash, ...)."""


@dataclass(frozen=True)
class Release(Message):
    """The worker has copied out of a reply segment; the daemon may reuse it."""

    TAG: ClassVar[str] = "release"
    shm: str


@dataclass(frozen=True)
class Stop(Message):
    """The daemon asks the worker to checkpoint and exit."""

    TAG: ClassVar[str] = "stop"
    reason: str


_TYPES: dict[str, type[Message]] = {cls.TAG: cls for cls in (WorkerHello, Setup, Call, Reply, Progress, Release, Stop)}


def encode(message: Message) -> bytes:
    body: dict[str, Any] = {"t": message.TAG}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if f.name == "tensors":
            value = [ref.to_wire() for ref in value]
        body[f.name] = value
    return encode_frame(body)


def decode(body: Any) -> Message:
    """Build the typed message from a decoded frame, checking its fields.

    Raises:
        ProtocolViolation: unknown type, missing/unknown field, or a field of the wrong kind.
    """
    if not isinstance(body, dict) or body.get("t") not in _TYPES:
        raise ProtocolViolation(f"unknown IPC message {str(body)[:80]}")
    cls = _TYPES[body["t"]]
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(body) - names - {"t"}
    if extra:
        raise ProtocolViolation(f"{cls.__name__} has unknown fields {sorted(extra)}")
    kwargs = {k: v for k, v in body.items() if k != "t"}
    if "tensors" in kwargs:
        if not isinstance(kwargs["tensors"], list):
            raise ProtocolViolation("tensors must be a list")
        kwargs["tensors"] = [TensorRef.from_wire(x) for x in kwargs["tensors"]]
    try:
        message = cls(**kwargs)
    except TypeError as exc:
        raise ProtocolViolation(f"{cls.__name__}: {exc}") from None
    _check_types(message)
    return message


_SIMPLE = {"int": int, "str": str, "float": (int, float), "dict[str, Any]": dict, "dict[str, str]": dict,
           "list[TensorRef]": list, "Any": object, "float | None": (int, float, type(None))}


def _check_types(message: Message) -> None:
    for f in dataclasses.fields(message):
        expected = _SIMPLE.get(str(f.type))
        value = getattr(message, f.name)
        if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
            raise ProtocolViolation(f"{type(message).__name__}.{f.name} must be {f.type}, got {type(value).__name__}")


async def send(writer: asyncio.StreamWriter, message: Message) -> None:
    writer.write(encode(message))
    await writer.drain()


async def recv(reader: asyncio.StreamReader) -> Message:
    """Read one message.

    Raises:
        EndOfStream: the other side closed the socket between messages.
        ProtocolViolation: an oversized or malformed frame.
    """
    try:
        header = await reader.readexactly(HEADER_BYTES)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise EndOfStream("the other process closed the IPC socket") from None
        raise ProtocolViolation("IPC socket closed inside a frame header") from None
    length = parse_header(header, MAX_FRAME_BYTES)
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ProtocolViolation("IPC socket closed inside a frame") from None
    return decode(decode_body(body))
