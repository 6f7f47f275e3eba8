"""The dashboard in a real browser, the token wall, and /metrics in Prometheus text format."""

from __future__ import annotations

import os
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import _requires
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hyphae.node.testing import DaemonProcess, sync_wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ARTIFACTS = Path(os.environ.get("HYPHAE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
SMALL = "[training]\nbatch_size = 4\nseq_len = 64\nlog_every = 5\neval_every = 20\ncheckpoint_every = 0\n"


def _browser():
    pytest.importorskip("selenium", reason="selenium is in the [test] extra")
    found = (_requires.find("chromium"), _requires.find("chromedriver"))
    assert found[0] and found[1], "the tools marker skips this test without them"
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = found[0][0]
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={tempfile.mkdtemp()}",
                "--window-size=1400,1100"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(found[1][0]), options=opts)


@pytest.mark.tools("chromium", "chromedriver")
def test_browser_sees_peers_and_a_live_loss_chart_on_a_3_node_testnet(tmp_path) -> None:
    config = tmp_path / "small.toml"
    config.write_text(SMALL)
    nodes = [DaemonProcess(tmp_path / "n0", ["--config", str(config)], train=True).start()]
    try:
        nodes += [DaemonProcess(tmp_path / f"n{i}", ["--config", str(config), "--bootstrap", nodes[0].multiaddr],
                                train=True).start() for i in (1, 2)]
        browser = _browser()
        try:
            browser.get(nodes[0].info["api_url"] + "/")
            rows = lambda: browser.execute_script("return document.querySelectorAll('#peers tbody tr').length")
            sync_wait(lambda: rows() == 2, 60, "both peers in the table")
            points = lambda: browser.execute_script("return window.hyphaeDashboard.lossChart.data[0].length")
            sync_wait(lambda: points() >= 1, 120, "a first loss point")
            first = points()
            sync_wait(lambda: points() > first, 120, "the loss chart to update")
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            browser.save_screenshot(str(shot))
            assert shot.stat().st_size > 10_000
            text = browser.find_element("id", "training-facts").text
            assert "running" in text and "tiny" in text
        finally:
            browser.quit()
    finally:
        for n in nodes:
            n.kill()


def test_remote_bound_dashboard_and_api_refuse_requests_without_the_token(make_daemon) -> None:
    d = make_daemon("a", "--api", "0.0.0.0:0")
    base = d.info["api_url"].replace("0.0.0.0", "127.0.0.1")
    for path in ("/", "/api/v1/node", "/api/v1/dashboard", "/static/app.js", "/metrics"):
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(base + path, timeout=5)
        assert err.value.code == 401, path
    token = (d.data_dir / "api.token").read_text().strip()
    with urllib.request.urlopen(f"{base}/?token={token}", timeout=5) as resp:
        assert b"hyphae" in resp.read()


def test_metrics_parse_as_prometheus_text(make_daemon) -> None:
    a = make_daemon("a")
    b = make_daemon("b", "--bootstrap", a.multiaddr)
    sync_wait(lambda: b.peer_id in a.peer_ids(), 10, "b joined a")

    def families() -> dict:
        with urllib.request.urlopen(a.info["api_url"] + "/metrics", timeout=5) as resp:
            return {f.name: f for f in text_string_to_metric_families(resp.read().decode())}

    def direct_connections() -> float:
        return next(s.value for s in families()["hyphae_connections"].samples if s.labels == {"type": "direct"})

    assert {"hyphae_node_info", "hyphae_uptime_seconds", "hyphae_connections", "hyphae_dht_routing_table_peers"} <= set(families())
    # b's connection; a reachability dial-back from b's side is a second one for a moment.
    sync_wait(lambda: direct_connections() == 1, 20, "one direct connection (b's)")


def test_openapi_document_lists_every_route(make_daemon) -> None:
    import json

    d = make_daemon("a")
    spec = d.api("/api/v1/openapi.json")
    assert spec["openapi"].startswith("3.")
    assert {"/api/v1/node", "/api/v1/peers", "/api/v1/reachability", "/api/v1/training", "/api/v1/events", "/metrics"} <= set(spec["paths"])
    json.dumps(spec)
