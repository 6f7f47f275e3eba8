"""A userspace link emulator on an NFQUEUE: delay, loss and an aggregate rate, in pure Python.

Why not ``tc netem``: the kernel of these machines is built without ``sch_netem`` (and without
``sch_fq``), so ``tc qdisc add ... netem`` fails with "Specified qdisc kind is unknown". Every
netfilter piece is there, though, so iptables sends the scenario's packets to a queue
(``-j NFQUEUE --queue-bypass``) and this thread holds each one for the configured delay before
accepting it, drops a random fraction, and spaces them out to a byte rate. Delay is constant,
so packets leave in the order they came and one ``VERDICT_BATCH`` releases all that are due.

The netlink messages are the stable nfnetlink_queue ABI (``linux/netfilter/nfnetlink_queue.h``);
no C library is needed. ``--queue-bypass`` plus fail-open mean that if this thread is not
running, or the queue is full, packets pass instead of vanishing.

It also runs as a program, for places that need one per network namespace (a netlink socket
belongs to the namespace it was opened in): the netns harness (``deploy/netns/links.py``) starts
``ip netns exec NS python _nfqueue.py --queue 0 --queue 1 --delay-ms 50 --loss 0.01`` where the
kernel has no netem. It imports only the standard library, so it runs by path, outside the
package. It prints ``ready`` once its queues are bound and runs until SIGTERM or SIGINT; with
``--stdin`` it takes a new shape as one JSON line on stdin (``{"delay_ms": 100, "loss": 0.03}``)
and exits at EOF (its parent died). Either way it releases what it holds before it exits.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import logging
import random
import select
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

__all__ = ["LinkShape", "Delayer"]

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNL_SUBSYS_QUEUE = 3
NFQNL_MSG_PACKET, NFQNL_MSG_VERDICT, NFQNL_MSG_CONFIG, NFQNL_MSG_VERDICT_BATCH = 0, 1, 2, 3
NFQA_PACKET_HDR, NFQA_VERDICT_HDR, NFQA_CAP_LEN, NFQA_PAYLOAD = 1, 2, 13, 10
NFQA_CFG_CMD, NFQA_CFG_PARAMS, NFQA_CFG_QUEUE_MAXLEN, NFQA_CFG_MASK, NFQA_CFG_FLAGS = 1, 2, 3, 4, 5
NFQNL_CFG_CMD_BIND, NFQNL_CFG_CMD_UNBIND = 1, 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN, NFQA_CFG_F_GSO = 1, 4
NF_DROP, NF_ACCEPT = 0, 1
NLM_F_REQUEST, NLM_F_ACK = 1, 4
NLMSG_ERROR = 2
QUEUE_MAXLEN = 16384
COPY_RANGE = 40  # the IP header: enough to read the packet's length


@dataclass(frozen=True)
class LinkShape:
    """What the emulated link does to each packet (each direction is a separate traversal)."""

    delay_ms: float = 0.0
    """Added one-way delay; a round trip pays it twice."""
    loss: float = 0.0
    """Fraction of packets dropped at random (0.01 = 1 %)."""
    rate_mbit: float = 0.0
    """Aggregate rate of all queued traffic in Mbit/s (0 = unlimited)."""

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.delay_ms > 10_000:
            raise ValueError(f"delay_ms must be in 0..10000, got {self.delay_ms}")
        if not 0 <= self.loss < 1:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")
        if self.rate_mbit < 0:
            raise ValueError(f"rate_mbit must be >= 0 (0 = unlimited), got {self.rate_mbit}")


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return struct.pack("=HH", length, kind) + payload + b"\0" * ((4 - length % 4) % 4)


def _message(msg_type: int, queue: int, attrs: bytes, *, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    return struct.pack("=IHHII", 16 + len(body), (NFNL_SUBSYS_QUEUE << 8) | msg_type, flags, seq, 0) + body


def _attrs(data: bytes, offset: int) -> dict[int, bytes]:
    out = {}
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & 0x7FFF] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


class Delayer:
    """Runs the link emulator for one queue number in a thread (start/close; joins it).

    Args:
        queue: the NFQUEUE number the iptables rule sends packets to.
        shape: the initial link shape; :meth:`set_shape` changes it while running.
        seed: for the loss draws (reports are reproducible in what they ask for, not in timing).
    """

    def __init__(self, queue: int, shape: LinkShape, *, seed: int = 0) -> None:
        self.queue = queue
        self.shape = shape
        self._random = random.Random(seed)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._held: collections.deque[tuple[float, int]] = collections.deque()
        self._next_free = 0.0
        self.stats = {"packets": 0, "dropped": 0, "bytes": 0, "max_held": 0, "verdict_errors": 0}

    def set_shape(self, shape: LinkShape) -> None:
        """Change the link from the next packet on (packets already held keep their times)."""
        self.shape = shape

    def start(self) -> Delayer:
        """Bind the queue (raises OSError, e.g. EBUSY if another program holds it) and start."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, 33, 16 << 20)  # SO_RCVBUFFORCE (root): no ENOBUFS bursts
            except OSError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 << 20)
            sock.bind((0, 0))
            self._sock = sock
            self._configure(_attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_BIND, 0, socket.AF_INET)))
            self._configure(_attr(NFQA_CFG_PARAMS, struct.pack("!IB", COPY_RANGE, NFQNL_COPY_PACKET))
                            + _attr(NFQA_CFG_QUEUE_MAXLEN, struct.pack("!I", QUEUE_MAXLEN))
                            + _attr(NFQA_CFG_MASK, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO))
                            + _attr(NFQA_CFG_FLAGS, struct.pack("!I", NFQA_CFG_F_FAIL_OPEN | NFQA_CFG_F_GSO)))
        except OSError:
            sock.close()
            self._sock = None
            raise
        self._thread = threading.Thread(target=self._run, name=f"nfqueue-{self.queue}", daemon=True)
        self._thread.start()
        return self

    def _configure(self, attrs: bytes) -> None:
        self._sock.send(_message(NFQNL_MSG_CONFIG, self.queue, attrs, flags=NLM_F_REQUEST | NLM_F_ACK, seq=1))
        reply = self._sock.recv(65536)
        length, kind = struct.unpack_from("=IH", reply, 0)
        if kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", reply, 16)[0]
            if code:
                raise OSError(code, f"nfqueue {self.queue} config: {errno.errorcode.get(code, code)}")

    def close(self) -> None:
        """Release every held packet, unbind, and join the thread (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None
        if self._sock is not None:
            try:
                self._release(float("inf"))
                self._sock.send(_message(NFQNL_MSG_CONFIG, self.queue,
                                         _attr(NFQA_CFG_CMD, struct.pack("!BBH", NFQNL_CFG_CMD_UNBIND, 0, 0))))
            except OSError:
                pass
            self._sock.close()
            self._sock = None

    # ---- the loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        sock = self._sock
        while not self._stop.is_set():
            wait = 0.05 if not self._held else max(0.0, min(0.05, self._held[0][0] - time.monotonic()))
            readable, _, _ = select.select([sock], [], [], wait)
            if readable:
                self._drain(sock)
            self._release(time.monotonic())

    def _drain(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # the kernel dropped queue messages: TCP retransmits them
                    log.warning("nfqueue %d: receive buffer overflowed", self.queue)
                    continue
                raise
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("=IH", data, offset)
                if length < 16:
                    break
                if kind & 0xFF == NFQNL_MSG_PACKET and kind >> 8 == NFNL_SUBSYS_QUEUE:
                    self._on_packet(_attrs(data[offset:offset + length], 20))
                offset += (length + 3) & ~3

    def _on_packet(self, attrs: dict[int, bytes]) -> None:
        header = attrs.get(NFQA_PACKET_HDR)
        if header is None:
            return
        packet_id = struct.unpack_from("!I", header, 0)[0]
        if NFQA_CAP_LEN in attrs:
            size = struct.unpack("!I", attrs[NFQA_CAP_LEN])[0]
        else:
            payload = attrs.get(NFQA_PAYLOAD, b"")
            size = struct.unpack_from("!H", payload, 2)[0] if len(payload) >= 4 else len(payload)
        shape = self.shape
        self.stats["packets"] += 1
        if shape.loss and self._random.random() < shape.loss:
            self.stats["dropped"] += 1
            self._verdict(NFQNL_MSG_VERDICT, NF_DROP, packet_id)
            return
        now = time.monotonic()
        due = now + shape.delay_ms / 1000.0
        if shape.rate_mbit:
            self._next_free = max(self._next_free, now) + size * 8 / (shape.rate_mbit * 1e6)
            due = max(due, self._next_free)
        if self._held and due < self._held[-1][0]:
            due = self._held[-1][0]  # never overtake: a shorter new delay must not reorder packets
        self._held.append((due, packet_id))
        self.stats["bytes"] += size
        self.stats["max_held"] = max(self.stats["max_held"], len(self._held))

    def _release(self, now: float) -> None:
        last = None
        while self._held and self._held[0][0] <= now:
            last = self._held.popleft()[1]
        if last is not None:
            self._verdict(NFQNL_MSG_VERDICT_BATCH, NF_ACCEPT, last)

    def _verdict(self, msg_type: int, verdict: int, packet_id: int) -> None:
        try:
            self._sock.send(_message(msg_type, self.queue, _attr(NFQA_VERDICT_HDR, struct.pack("!II", verdict, packet_id))))
        except OSError as exc:
            self.stats["verdict_errors"] += 1
            log.warning("nfqueue %d: verdict for packet %d failed: %s", self.queue, packet_id, exc)


def main(argv: list[str] | None = None) -> int:
    """Delay the packets of each ``--queue`` until stdin closes (see the module docstring)."""
    parser = argparse.ArgumentParser(description="NFQUEUE link emulator (delay, loss, rate)")
    parser.add_argument("--queue", type=int, action="append", required=True, help="NFQUEUE number; repeatable")
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--loss", type=float, default=0.0, help="fraction of packets dropped (0.01 = 1 %%)")
    parser.add_argument("--rate-mbit", type=float, default=0.0, help="per queue; 0 = unlimited")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stdin", action="store_true", help="read new shapes from stdin; exit at its EOF")
    args = parser.parse_args(argv)
    shape = LinkShape(args.delay_ms, args.loss, args.rate_mbit)
    delayers: list[Delayer] = []
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        for queue in args.queue:  # one thread each: a direction's rate is its own, as with netem
            delayers.append(Delayer(queue, shape, seed=args.seed + queue).start())
        print("ready", flush=True)
        if not args.stdin:
            threading.Event().wait()
        for line in sys.stdin:
            if line.strip():
                new = LinkShape(**json.loads(line))
                for delayer in delayers:
                    delayer.set_shape(new)
    except KeyboardInterrupt:
        pass
    finally:
        for delayer in delayers:
            delayer.close()
    return 0


def _exit_cleanly(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through main's finally: held packets go out


if __name__ == "__main__":
    sys.exit(main())
