"""Daemon <-> worker IPC: typed dataclass messages as msgpack frames over a local socket.

Only small metadata crosses the socket; tensors travel in shared memory (:mod:`.shm`) and a
message names the segment and where each tensor lies in it. Nothing is pickled: each message
type declares its fields and :func:`decode` checks them, so a confused or compromised worker
cannot make the daemon build arbitrary objects. Beyond the field types, :func:`decode` checks
what the daemon would otherwise act on blindly: each Comm call's arguments against its method's
schema (an int where bytes belong would make ``bytes(n)`` allocate n bytes), tensor refs
(known dtype, ``nbytes`` equal to shape x item size, bounded rank), segment names (the
``/dev/shm`` name is opened as given) and progress reports (known kind, flat metrics).

Who is on the other end is told by the kernel, never by a message: :func:`peer_credentials`
reads ``SO_PEERCRED`` (the pid, uid and gid of the process that connected), which the daemon
compares with the worker it spawned. A pid claimed in :class:`WorkerHello` proves nothing:
the socket is a Linux abstract one, which every local user can connect to.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hyphae.protocol.errors import EndOfStream, ProtocolViolation
from hyphae.protocol.wire import HEADER_BYTES, decode_body, encode_frame, expect_map, parse_header

__all__ = [
    "TensorRef", "WorkerHello", "Setup", "Call", "Reply", "Progress", "Release", "Stop",
    "Message", "send", "recv", "MAX_FRAME_BYTES", "peer_credentials",
]

MAX_FRAME_BYTES = 16 << 20
MAX_NAME_CHARS = 256
MAX_RANK = 8
MAX_DIM = 1 << 40
MAX_TENSORS = 65536
SHM_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
DTYPE_BYTES: dict[str, int] = {
    "float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int64": 8, "int32": 4, "int16": 2,
    "int8": 1, "uint8": 1, "bool": 1,
}
"""What may cross between daemon and worker (the same table as :data:`.shm.ITEM_BYTES`)."""


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
                and all(_is_int(d, 0, MAX_DIM) for d in shape)
                and _is_int(offset, 0, MAX_DIM) and _is_int(nbytes, 0, MAX_DIM)):
            raise ProtocolViolation(f"malformed tensor ref {item!r:.80}")
        if not 0 < len(name) <= MAX_NAME_CHARS or len(shape) > MAX_RANK or dtype not in DTYPE_BYTES:
            raise ProtocolViolation(f"tensor ref {name[:40]!r}: name of 1-{MAX_NAME_CHARS} characters, rank <= "
                                    f"{MAX_RANK} and a dtype of {sorted(DTYPE_BYTES)} needed, got {item!r:.80}")
        if nbytes != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise ProtocolViolation(f"tensor ref {name[:40]!r}: nbytes {nbytes} is not shape {shape} x "
                                    f"{DTYPE_BYTES[dtype]} bytes of {dtype}")
        return cls(name, dtype, tuple(shape), offset, nbytes)


def _is_int(value: Any, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


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
    rank: int = 0
    """This worker's rank in its node's local group; rank 0 alone talks to the run."""
    world: int = 1
    """Workers on this node, one member of the run (hyphae.training.local_group)."""
    group_port: int = 0
    """The local group's rendezvous port on 127.0.0.1 (when world > 1)."""
    init_from: str = ""
    threads: int = 0
    model_dir: str = ""
    tokenizer: str = ""
    text_field: str = "text"
    grad_accum: int = 1
    precision: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False


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
    message: str = ""
    """With kind "failed": why the worker cannot train (a setting to fix); it exits and is not
    restarted."""


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
    tag = body.get("t") if isinstance(body, dict) else None
    if not isinstance(tag, str) or tag not in _TYPES:
        raise ProtocolViolation(f"unknown IPC message {str(body)[:80]}")
    cls = _TYPES[tag]
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
    _check_content(message)
    return message


_NUM = (int, float)
CALL_ARGS: dict[str, dict[str, Any]] = {
    "members": {},
    "exchange": {"peer": str, "tag": str, "timeout_s": _NUM},
    "all_reduce": {"group": list, "tag": str, "timeout_s": _NUM, "op": str},
    "publish": {"topic": str, "step": int, "value": bytes},
    "collect": {"topic": str, "step": int, "peers": list, "timeout_s": _NUM},
    "put_blob": {},  # the bytes are the uint8 tensor "blob" in the call's segment
    "get_blob": {"digest": str, "timeout_s": _NUM},
    "state_get": {"key": str},
    "state_set": {"key": str, "value": (object, bool)},  # any plain value, booleans too
    "state_items": {"prefix": str},
    "refuse": {"peer": str, "reason": str},
}
"""The argument schema of each Comm method a worker may call."""
PROGRESS_KINDS = frozenset({"log", "eval", "checkpoint", "joined", "resumed", "done", "failed"})
MAX_LIST = 65536
MAX_METRICS = 128


def _check_content(message: Message) -> None:
    """What a field's type does not say: schemas of call arguments, names, bounds."""
    for name in ("shm",):
        value = getattr(message, name, None)
        if value and not SHM_NAME_RE.match(value):
            raise ProtocolViolation(f"{type(message).__name__}.shm {value[:40]!r} is not a segment name "
                                    f"({SHM_NAME_RE.pattern})")
    if isinstance(message, Release) and not message.shm:
        raise ProtocolViolation("Release.shm must name a segment")
    if isinstance(message, (Call, Reply)) and len(message.tensors) > MAX_TENSORS:
        raise ProtocolViolation(f"{len(message.tensors)} tensor refs, limit {MAX_TENSORS}")
    if isinstance(message, Call):
        schema = CALL_ARGS.get(message.method)
        if schema is None:
            raise ProtocolViolation(f"unknown Comm method {message.method[:40]!r}; known: {', '.join(CALL_ARGS)}")
        args = expect_map(message.args, schema, what=f"{message.method} arguments")
        for key in ("group", "peers"):
            if key in args and (len(args[key]) > MAX_LIST or not all(isinstance(p, str) for p in args[key])):
                raise ProtocolViolation(f"{message.method} {key} must be a list of at most {MAX_LIST} peer ids")
        if "timeout_s" in args and not 0 < args["timeout_s"] <= 86400:
            raise ProtocolViolation(f"{message.method} timeout_s must be in (0, 86400] s, got {args['timeout_s']!r}")
        if "step" in args and not -(1 << 62) <= args["step"] < (1 << 62):
            raise ProtocolViolation(f"{message.method} step {args['step']} is out of range")
    if isinstance(message, Progress):
        if message.kind not in PROGRESS_KINDS:
            raise ProtocolViolation(f"progress kind {message.kind[:40]!r} is not one of {sorted(PROGRESS_KINDS)}")
        if len(message.metrics) > MAX_METRICS or not all(
                isinstance(k, str) and len(k) <= 64 and _flat(v) for k, v in message.metrics.items()):
            raise ProtocolViolation(f"progress metrics must be at most {MAX_METRICS} short names of numbers, "
                                    "strings or short lists of them")


def _flat(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float)):
        return True
    if isinstance(value, str):
        return len(value) <= 1024
    return isinstance(value, list) and len(value) <= 64 and all(
        isinstance(v, (bool, int, float)) or (isinstance(v, str) and len(v) <= 1024) for v in value)


_SIMPLE = {"int": int, "str": str, "float": (int, float), "dict[str, Any]": dict, "dict[str, str]": dict,
           "list[TensorRef]": list, "Any": object, "float | None": (int, float, type(None))}


def _check_types(message: Message) -> None:
    for f in dataclasses.fields(message):
        expected = _SIMPLE.get(str(f.type))
        value = getattr(message, f.name)
        if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
            raise ProtocolViolation(f"{type(message).__name__}.{f.name} must be {f.type}, got {type(value).__name__}")


def peer_credentials(writer: asyncio.StreamWriter) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel saw it
    connect (``SO_PEERCRED``); the other side cannot forge it.

    Raises:
        ProtocolViolation: not a Unix socket, or the kernel would not say.
    """
    sock = writer.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        raise ProtocolViolation("peer credentials need a Unix socket")
    try:
        pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
    except OSError as exc:
        raise ProtocolViolation(f"no peer credentials on the IPC socket: {exc}") from None
    return pid, uid, gid


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
