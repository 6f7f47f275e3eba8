"""The daemon as users run it: real ``hyphae node join`` processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from hyphae.node.testing import sync_wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def hyphae(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hyphae.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_join_writes_node_json_and_serves_the_api(make_daemon) -> None:
    d = make_daemon("a")
    assert set(d.info) >= {"peer_id", "multiaddrs", "api_url", "pid"}
    assert d.info["multiaddrs"][0].endswith("/p2p/" + d.peer_id)
    node = d.api("/api/v1/node")
    assert node["peer_id"] == d.peer_id and node["version"] and node["uptime_s"] >= 0
    assert node["addrs"] == d.info["multiaddrs"]
    assert d.api("/api/v1/peers") == {"peers": []}
    assert "hyphae node ready" in d.log()


def test_second_daemon_visible_within_10s_and_third_found_through_the_dht(make_daemon) -> None:
    a = make_daemon("a")
    start = time.monotonic()
    b = make_daemon("b", "--bootstrap", a.multiaddr)
    sync_wait(lambda: b.peer_id in a.peer_ids(), 10, "b in a's /api/v1/peers")
    assert time.monotonic() - start < 10
    peer = next(p for p in a.api("/api/v1/peers")["peers"] if p["peer_id"] == b.peer_id)
    assert peer["connection"] == "direct" and set(peer) >= {"peer_id", "addrs", "connection", "rtt_ms"}
    c = make_daemon("c", "--bootstrap", b.multiaddr)
    sync_wait(lambda: a.peer_id in c.peer_ids(), 20, "c finds a through the DHT")


def test_sigterm_stops_within_5s_saves_state_and_restart_keeps_the_peer_id(make_daemon) -> None:
    a = make_daemon("a")
    b = make_daemon("b", "--bootstrap", a.multiaddr)
    sync_wait(lambda: a.peer_id in b.peer_ids(), 10, "b meets a")
    peer_id = b.peer_id
    start = time.monotonic()
    b.signal(signal.SIGTERM)
    assert b.wait(10) == 0
    assert time.monotonic() - start < 5
    assert not (b.data_dir / "node.json").exists()
    assert a.peer_id in (b.data_dir / "peers.json").read_text()
    b.args = []  # restart without any bootstrap: the peer book must lead back to a
    b.start()
    assert b.peer_id == peer_id
    sync_wait(lambda: a.peer_id in b.peer_ids(), 10, "b redials a from its peer book")


def test_ctrl_c_stops_cleanly(make_daemon) -> None:
    d = make_daemon("a")
    d.signal(signal.SIGINT)
    assert d.wait(10) == 0
    assert "stopped cleanly" in d.log()


def test_second_instance_on_the_same_data_dir_is_refused(make_daemon) -> None:
    a = make_daemon("a")
    second = hyphae("node", "join", "--data-dir", str(a.data_dir), "--no-train", "--no-mdns",
                    "--listen", "/ip4/127.0.0.1/tcp/0", "--api", "127.0.0.1:0")
    assert second.returncode == 1
    assert f"another hyphae daemon (pid {a.proc.pid}) is running" in second.stderr
    assert a.api("/api/v1/node")["peer_id"] == a.peer_id  # the first one is untouched


def test_cli_status_and_leave(make_daemon) -> None:
    a = make_daemon("a")
    b = make_daemon("b", "--bootstrap", a.multiaddr)
    sync_wait(lambda: b.peer_id in a.peer_ids(), 10, "b joined a")
    status = hyphae("node", "status", "--data-dir", str(a.data_dir), "--json")
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    assert data["node"]["peer_id"] == a.peer_id and data["peers"][0]["peer_id"] == b.peer_id
    text = hyphae("node", "status", "--data-dir", str(a.data_dir))
    assert a.peer_id in text.stdout and "1 connected" in text.stdout
    leave = hyphae("node", "leave", "--data-dir", str(a.data_dir))
    assert leave.returncode == 0 and "stopped" in leave.stdout
    assert a.wait(5) == 0
    gone = hyphae("node", "status", "--data-dir", str(a.data_dir))
    assert gone.returncode == 1 and "no daemon is running" in gone.stderr


def test_keygen_makes_the_identity_the_daemon_then_uses(tmp_path, make_daemon) -> None:
    out = hyphae("keygen", "--data-dir", str(tmp_path / "k"))
    assert out.returncode == 0, out.stderr
    peer_id = out.stdout.split()[2]
    again = hyphae("keygen", "--data-dir", str(tmp_path / "k"))
    assert again.returncode == 2 and "--force" in again.stderr
    assert make_daemon("k").peer_id == peer_id


def test_api_beyond_loopback_requires_the_token(make_daemon) -> None:
    d = make_daemon("a", "--api", "0.0.0.0:0")
    url = d.info["api_url"].replace("0.0.0.0", "127.0.0.1")
    d.info["api_url"] = url
    with pytest.raises(urllib.error.HTTPError) as err:
        d.api("/api/v1/node")
    assert err.value.code == 401
    token = (d.data_dir / "api.token").read_text().strip()
    assert d.api("/api/v1/node", token=token)["peer_id"] == d.peer_id
    assert oct(os.stat(d.data_dir / "api.token").st_mode & 0o777) == "0o600"


def test_invalid_config_is_refused_with_what_to_fix(tmp_path) -> None:
    bad = hyphae("node", "join", "--data-dir", str(tmp_path), "--bootstrap", "/ip4/127.0.0.1/tcp/1")
    assert bad.returncode == 2 and "lacks the peer id" in bad.stderr
    cfg = tmp_path / "c.toml"
    cfg.write_text("[network]\nmdsn = false\n")
    bad = hyphae("node", "join", "--config", str(cfg))
    assert bad.returncode == 2 and "unknown key(s) mdsn" in bad.stderr
