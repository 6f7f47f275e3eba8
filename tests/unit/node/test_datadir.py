"""Data dir: one daemon per dir (flock: no stale lock after kill -9), node.json written atomically."""

import os
import subprocess
import sys

import pytest

from hyphae.node.datadir import AlreadyRunning, DataDir


def test_second_lock_is_refused_with_the_holders_pid(tmp_path) -> None:
    first, second = DataDir(tmp_path), DataDir(tmp_path)
    first.lock()
    try:
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            second.lock()
    finally:
        first.unlock()
    second.lock()
    second.unlock()


def test_lock_of_a_killed_process_is_free(tmp_path) -> None:
    code = "import sys,time; from hyphae.node.datadir import DataDir; DataDir(sys.argv[1]).lock(); print('locked', flush=True); time.sleep(60)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(AlreadyRunning):
        DataDir(tmp_path).lock()
    proc.kill()
    proc.wait()
    d = DataDir(tmp_path)
    d.lock()
    d.unlock()


def test_node_json_round_trip_and_token_is_private(tmp_path) -> None:
    d = DataDir(tmp_path)
    d.write_node_json({"peer_id": "x", "pid": 1})
    assert d.read_node_json() == {"peer_id": "x", "pid": 1}
    d.remove_node_json()
    assert d.read_node_json() is None
    token = d.api_token()
    assert token == d.api_token() and len(token) > 20
    assert (d.api_token_file.stat().st_mode & 0o077) == 0
