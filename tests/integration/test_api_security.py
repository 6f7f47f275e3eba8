"""The local API against web pages (CSRF, DNS rebinding, CORS) and floods, on real daemons.

Every attack is sent as a page or a script would send it, with exactly its headers; after each
batch the daemon must still be running and answering. The last two tests do it from a real
headless Chromium: an attacker page on another origin, and the dashboard's own Leave button.
"""

from __future__ import annotations

import http.server
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import _requires
import pytest

from hyphae.node.dashboard import MAX_EVENT_CLIENTS
from hyphae.node.testing import DaemonProcess, RawReply, raw_request, sync_wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

EVIL = "http://evil.example"
POSTS = {"/api/v1/node/leave": None, "/api/v1/run/config": json.dumps({"set": {"evil": 1}}).encode()}


def _req(d: DaemonProcess, method: str, path: str, **kwargs) -> RawReply:
    return raw_request(d.info["api_url"], method, path, **kwargs)


def _port(d: DaemonProcess) -> int:
    return urllib.parse.urlsplit(d.info["api_url"]).port


def _alive(d: DaemonProcess) -> bool:
    return d.proc.poll() is None and _req(d, "GET", "/api/v1/node").status == 200


def _json(reply: RawReply) -> dict:
    return json.loads(reply.body)


def test_cross_origin_tokenless_and_malformed_posts_are_refused_and_the_daemon_keeps_running(make_daemon) -> None:
    d = make_daemon("a")
    token, own = d.token, f"http://127.0.0.1:{_port(d)}"
    bearer = {"Authorization": f"Bearer {token}"}
    as_json = {"Content-Type": "application/json"}
    attacks = {
        "cross-origin, no token": ({"Origin": EVIL}, 403),
        "cross-origin with the real token": ({"Origin": EVIL, **bearer}, 403),
        "cross-origin Referer, no Origin": ({"Referer": f"{EVIL}/page.html", **bearer}, 403),
        "Origin null (sandboxed frame, file://)": ({"Origin": "null", **bearer}, 403),
        "same origin, no token": ({"Origin": own}, 403),
        "no token at all": ({}, 403),
        "wrong bearer token": ({"Authorization": "Bearer " + "x" * len(token)}, 403),
        "wrong CSRF token": ({"X-Hyphae-CSRF": "guess", "Origin": own}, 403),
        "token in the query only": ({}, 403),  # see the path below: ?token= counts for reads only
    }
    for path, body in POSTS.items():
        for what, (headers, status) in attacks.items():
            target = f"{path}?token={token}" if what == "token in the query only" else path
            reply = _req(d, "POST", target, headers={**as_json, **headers} if body else headers, body=body)
            assert reply.status == status, (path, what, reply)
            assert "error" in _json(reply) and "access-control-allow-origin" not in reply.headers
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            reply = _req(d, "POST", path, headers={"Content-Type": ctype, **bearer}, body=b'{"set": {"evil": 1}}')
            assert reply.status == 415, (path, ctype, reply)
        huge = b'{"set": {"k": "' + b"x" * (1 << 20) + b'"}}'
        assert _req(d, "POST", path, headers={**as_json, **bearer}, body=huge).status == 413
    assert _alive(d), d.log()[-2000:]
    assert "evil" not in d.api("/api/v1/run")["config"]


def test_a_rebinding_host_is_refused_on_every_route_and_loopback_names_are_not(make_daemon) -> None:
    d = make_daemon("a")
    port = _port(d)
    spec = d.api("/api/v1/openapi.json")
    gets = [p for p, ops in spec["paths"].items() if "get" in ops]
    routes = [*gets, "/", "/static/app.js", "/api/v1/csrf", "/api/v1/run", "/api/v1/peers/scores", "/no/such/route"]
    assert {"/api/v1/events", "/metrics", "/api/v1/csrf"} <= set(routes)
    hosts = ["evil.example", f"evil.example:{port}", f"127.0.0.1.nip.io:{port}", f"localhost.evil.example:{port}",
             f"127.0.0.1@evil.example:{port}", f"evil.example:{port}:1", "", "[::1"]
    for host in hosts:
        for path in routes:
            reply = _req(d, "GET", path, headers={"Host": host})
            assert reply.status == 403 and "Host" in _json(reply)["error"], (host, path, reply)
        for path, body in POSTS.items():  # the token is no way around the Host check
            reply = _req(d, "POST", path, headers={"Host": host, "Authorization": f"Bearer {d.token}",
                                                   "Content-Type": "application/json"}, body=body)
            assert reply.status == 403, (host, path, reply)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "127.8.9.10", "LOCALHOST.", "[::1]"):
        assert _req(d, "GET", "/api/v1/node", headers={"Host": host}).status == 200, host
    assert _alive(d)


def test_cors_headers_only_for_listed_origins_and_allowed_hosts_pass_the_host_check(make_daemon, tmp_path) -> None:
    plain = make_daemon("plain")
    for method, headers in (("GET", {"Origin": EVIL}),
                            ("OPTIONS", {"Origin": EVIL, "Access-Control-Request-Method": "POST"})):
        reply = _req(plain, method, "/api/v1/node", headers=headers)
        assert not [h for h in reply.headers if h.startswith("access-control-")], reply
        assert reply.status == (200 if method == "GET" else 403)

    tools = "http://tools.example:8080"
    config = tmp_path / "cors.toml"
    config.write_text(f'[api]\ncors_origins = ["{tools}"]\nallowed_hosts = ["node.example"]\n')
    d = make_daemon("cors", "--config", str(config))
    port = _port(d)
    pre = _req(d, "OPTIONS", "/api/v1/node/leave", headers={"Origin": tools, "Access-Control-Request-Method": "POST"})
    assert pre.status == 204 and pre.headers["access-control-allow-origin"] == tools
    assert "X-Hyphae-CSRF" in pre.headers["access-control-allow-headers"]
    assert _req(d, "OPTIONS", "/api/v1/node/leave",
                headers={"Origin": EVIL, "Access-Control-Request-Method": "POST"}).status == 403
    stream = _req(d, "GET", "/api/v1/events", headers={"Origin": tools})
    assert stream.status == 200 and stream.headers["access-control-allow-origin"] == tools
    assert "access-control-allow-origin" not in _req(d, "GET", "/api/v1/node", headers={"Origin": EVIL}).headers
    assert _req(d, "GET", "/api/v1/node", headers={"Host": f"node.example:{port}"}).status == 200
    assert _req(d, "GET", "/api/v1/node", headers={"Host": f"other.example:{port}"}).status == 403
    assert _req(d, "POST", "/api/v1/node/leave", headers={"Origin": tools}).status == 403  # listed, but no token
    assert _alive(d)
    left = _req(d, "POST", "/api/v1/node/leave", headers={"Origin": tools, "Authorization": f"Bearer {d.token}"})
    assert left.status == 200 and left.headers["access-control-allow-origin"] == tools
    assert d.wait(15) == 0


def test_bound_to_all_interfaces_ip_literals_pass_but_foreign_names_do_not(make_daemon) -> None:
    d = make_daemon("a", "--api", "0.0.0.0:0")
    d.info["api_url"] = d.info["api_url"].replace("0.0.0.0", "127.0.0.1")
    port, bearer = _port(d), {"Authorization": f"Bearer {d.token}"}
    assert _req(d, "GET", "/api/v1/node", headers={"Host": f"192.0.2.7:{port}", **bearer}).status == 200
    assert _req(d, "GET", "/api/v1/node", headers={"Host": f"192.0.2.7:{port}"}).status == 401
    assert _req(d, "GET", "/api/v1/node", headers={"Host": f"evil.example:{port}", **bearer}).status == 403
    assert _req(d, "POST", "/api/v1/node/leave", headers={"Host": f"evil.example:{port}", **bearer}).status == 403
    assert d.proc.poll() is None and _req(d, "GET", "/api/v1/node", headers=bearer).status == 200


def test_the_csrf_token_read_same_origin_lets_the_page_stop_the_daemon(make_daemon) -> None:
    d = make_daemon("a")
    own = f"http://127.0.0.1:{_port(d)}"
    reply = _req(d, "GET", "/api/v1/csrf", headers={"Origin": EVIL})
    assert reply.status == 200 and "access-control-allow-origin" not in reply.headers  # a foreign page cannot read it
    assert reply.headers["cache-control"] == "no-store"
    csrf = _json(reply)["csrf_token"]
    assert len(csrf) >= 32 and csrf != d.token
    assert _req(d, "POST", "/api/v1/node/leave", headers={"Origin": EVIL, "X-Hyphae-CSRF": csrf}).status == 403
    assert _req(d, "POST", "/api/v1/node/leave", headers={"Origin": own, "X-Hyphae-CSRF": csrf[:-1]}).status == 403
    assert _alive(d)
    assert _req(d, "POST", "/api/v1/node/leave", headers={"Origin": own, "X-Hyphae-CSRF": csrf}).status == 200
    assert d.wait(15) == 0


def _hyphae(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hyphae.cli", *args], capture_output=True, text=True, timeout=60)


def test_cli_run_config_set_and_node_leave_still_work_and_tokens_never_reach_the_log(make_daemon) -> None:
    d = make_daemon("a", "--log-level", "debug")
    sync_wait(lambda: d.api("/api/v1/run")["owner"] == d.peer_id, 30, "the node to create and own its run")
    token = d.token
    set_ = _hyphae("run", "config", "set", "lr=0.25", "--data-dir", str(d.data_dir))
    assert set_.returncode == 0 and "lr = 0.25" in set_.stdout, set_.stderr
    by_url = _hyphae("run", "config", "set", "warmup=true", "--api", d.info["api_url"], "--data-dir", str(d.data_dir))
    assert by_url.returncode == 0, by_url.stderr
    assert d.api("/api/v1/run")["config"] == {"lr": 0.25, "warmup": True}
    csrf = _json(_req(d, "GET", "/api/v1/csrf"))["csrf_token"]
    for path in (f"/api/v1/node?token={token}", f"/?token={token}", f"/api/v1/nope?token={token}&csrf={csrf}"):
        _req(d, "GET", path)
    _req(d, "POST", f"/api/v1/node/leave?token={token}", headers={"Origin": EVIL, "X-Hyphae-CSRF": csrf})
    leave = _hyphae("node", "leave", "--data-dir", str(d.data_dir))
    assert leave.returncode == 0 and "stopped" in leave.stdout, leave.stderr
    assert d.wait(10) == 0
    log = d.log()
    assert "leave requested over the API" in log  # the debug log is there, the secrets are not
    assert token not in log and csrf not in log


def _open_stream(port: int) -> tuple[socket.socket, int]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    line = b""
    while not line.endswith(b"\r\n"):
        chunk = s.recv(1)
        if not chunk:
            break
        line += chunk
    return s, int(line.split()[1])


def test_event_streams_beyond_the_cap_get_503_and_the_daemon_keeps_answering(make_daemon) -> None:
    d = make_daemon("a")
    port = _port(d)
    opened = [_open_stream(port) for _ in range(MAX_EVENT_CLIENTS + 10)]
    try:
        statuses = [status for _, status in opened]
        assert statuses.count(200) == MAX_EVENT_CLIENTS and statuses.count(503) == 10, statuses
        start = time.monotonic()
        assert _alive(d) and time.monotonic() - start < 2.0
    finally:
        for s, _ in opened:
            s.close()

    def a_stream_again() -> bool:
        s, status = _open_stream(port)
        s.close()
        return status == 200

    sync_wait(a_stream_again, 15, "a stream slot to free up once the clients left")
    assert _alive(d)


# ---- a real browser ----------------------------------------------------------------------------


def _browser(*flags: str):
    pytest.importorskip("selenium", reason="selenium is in the [test] extra")
    found = (_requires.find("chromium"), _requires.find("chromedriver"))
    assert found[0] and found[1], "the tools marker skips this test without them"
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = found[0][0]
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}", *flags):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(found[1][0]), options=opts)


ATTACK_FETCH = """<!doctype html><title>loading</title><script>
(async () => {
  const target = "%(target)s";
  await fetch(target + "/api/v1/node/leave", {method: "POST", mode: "no-cors"}).catch(() => {});
  await fetch(target + "/api/v1/run/config", {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                                              body: '{"set": {"evil": 1}}'}).catch(() => {});
  let read = "read";
  try { await (await fetch(target + "/api/v1/node")).json(); } catch (e) { read = "blocked"; }
  document.title = "done:" + read;
})();
</script>"""
ATTACK_FORM = """<!doctype html><form method="POST" enctype="text/plain" action="%(target)s/api/v1/node/leave">
<input name='{"x":"' value='"}'></form><script>document.forms[0].submit();</script>"""


@pytest.fixture
def attacker_site(tmp_path: Path) -> Iterator[int]:
    """A web server for the attacker's pages (its port); the browser reaches it as evil.example."""
    site = tmp_path / "site"
    site.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(site)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.tools("chromium", "chromedriver")
def test_an_attacker_page_in_a_real_browser_can_neither_stop_nor_read_the_node(make_daemon, attacker_site,
                                                                               tmp_path) -> None:
    d = make_daemon("a")
    target = d.info["api_url"]
    site = tmp_path / "site"
    (site / "fetch.html").write_text(ATTACK_FETCH % {"target": target})
    (site / "form.html").write_text(ATTACK_FORM % {"target": target})
    browser = _browser("--host-resolver-rules=MAP evil.example 127.0.0.1")
    try:
        browser.get(f"http://evil.example:{attacker_site}/fetch.html")
        sync_wait(lambda: browser.title.startswith("done:"), 30, "the attack page's fetches")
        assert browser.title == "done:blocked"  # no CORS header: the page cannot read the node
        browser.get(f"http://evil.example:{attacker_site}/form.html")  # a top-level form POST lands on our answer
        sync_wait(lambda: "refused" in browser.find_element("tag name", "body").text, 30, "the daemon's refusal")
        assert f"cross-origin POST from 'http://evil.example:{attacker_site}'" in browser.find_element("tag name", "body").text
        # DNS rebinding: the attacker's name now resolves to 127.0.0.1, so the browser sends its name as Host.
        browser.get(f"http://evil.example:{_port(d)}/api/v1/node")
        assert "is not this node's API" in browser.find_element("tag name", "body").text
        assert d.peer_id not in browser.page_source
    finally:
        browser.quit()
    assert _alive(d)
    assert "evil" not in d.api("/api/v1/run")["config"]


@pytest.mark.tools("chromium", "chromedriver")
def test_the_dashboard_leave_button_stops_the_node_through_its_own_origin(make_daemon) -> None:
    d = make_daemon("a")
    browser = _browser()
    try:
        browser.get(d.info["api_url"] + "/")
        sync_wait(lambda: browser.execute_script("return Number(document.body.dataset.updates || 0)") >= 1, 30,
                  "the page's first live update")
        browser.find_element("id", "leave").click()
        browser.switch_to.alert.accept()
        sync_wait(lambda: browser.execute_script("return document.body.dataset.left || document.body.dataset.leaveError"),
                  15, "the Leave request to answer")
        assert browser.execute_script("return document.body.dataset.left") == "true", \
            browser.execute_script("return document.body.dataset.leaveError")
    finally:
        browser.quit()
    assert d.wait(15) == 0
