"""The worker IPC socket is an abstract Unix socket every local user can reach (it is listed in
/proc/net/unix). A process that connects to it claiming the worker's pid must get nothing: the
daemon asks the kernel (SO_PEERCRED) who connected, refuses and logs it, and its real worker
trains on. Tried as uid ``nobody`` and as our own uid from a pid that is not the worker."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from hyphae.node import ipc
from hyphae.node.testing import DaemonProcess, sync_wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

SMALL = """
[training]
batch_size = 4
seq_len = 64
log_every = 5
eval_every = 0
checkpoint_every = 1000
algorithm = "ddp"
"""
NOBODY = 65534

def _ipc_addresses(daemon_pid: int) -> list[str]:
    """The daemon's abstract sockets as any user sees them in /proc/net/unix."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return sorted({"@" + line.split()[-1][1:] for line in lines
                   if line.split()[-1].startswith(f"@hyphae-{daemon_pid}-")})


def _spoof(address: str, claimed_pid: int, *, uid: int | None) -> str:
    """The attacker, in a forked child (as ``uid`` if given): connect, claim the worker's pid in
    a hello, ask to write the run state, and say whether the daemon answered ("answered": the
    old code sent it the worker's Setup) or hung up ("closed")."""
    frames = (ipc.encode(ipc.WorkerHello(index=0, pid=claimed_pid))
              + ipc.encode(ipc.Call(id=1, method="state_set", args={"key": "spoofed", "value": 1})))
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # only syscalls from here on, then _exit: nothing of pytest runs in the child
        result = b"error"
        try:
            os.close(read_end)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(10)
            sock.connect("\0" + address[1:])
            sock.sendall(frames)
            result = b"answered" if sock.recv(1) else b"closed"
        except (ConnectionError, TimeoutError):
            result = b"closed"
        finally:
            os.write(write_end, result)
            os._exit(0)
    os.close(write_end)
    try:
        return os.read(read_end, 64).decode()
    finally:
        os.close(read_end)
        os.waitpid(child, 0)


def _training(d: DaemonProcess) -> dict:
    return d.api("/api/v1/training")


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to uid nobody needs root")
def test_a_client_claiming_the_workers_pid_is_refused_and_the_worker_trains_on(tmp_path) -> None:
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    d = DaemonProcess(tmp_path / "a", ["--config", str(config)], train=True).start()
    try:
        first = sync_wait(lambda: (t := _training(d))["step"] >= 5 and t, 120, "the worker training")
        worker = first["worker_pid"]
        (address,) = _ipc_addresses(d.proc.pid)
        assert _spoof(address, worker, uid=NOBODY) == "closed"
        assert _spoof(address, worker, uid=None) == "closed"  # our uid, but not the worker's pid
        log = d.log()
        assert "refusing an IPC connection from pid" in log and f" uid {NOBODY}: not the worker" in log
        assert log.count(f"not the worker this daemon started (pid {worker}") == 2
        sync_wait(lambda: _training(d)["step"] >= first["step"] + 10, 120, "the real worker still training")
        after = _training(d)
        assert after["worker_pid"] == worker and after["worker_restarts"] == 0
    finally:
        d.kill()
