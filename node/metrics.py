"""Prometheus ``/metrics``: every ``hyphae_`` metric is read from the daemon at scrape time.

The text format comes from prometheus-client (a well-kept library, and what scrapers and the
tests parse with) through a custom collector, so there are no counters to keep in sync: each
scrape asks the components for their current numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

if TYPE_CHECKING:
    from .daemon import Daemon

__all__ = ["metrics_route"]


class _Snapshot:
    """What one scrape reports, gathered from the daemon in its event loop."""

    def __init__(self, node: dict[str, Any], peers: list[dict[str, Any]], extras: dict[str, Any]) -> None:
        self.node, self.peers, self.extras = node, peers, extras


class _DaemonCollector:
    def __init__(self) -> None:
        self.snapshot: _Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        node, peers = snap.node, snap.peers
        info = InfoMetricFamily("hyphae_node", "This node", labels=[])
        info.add_metric([], {"peer_id": node["peer_id"], "version": node["version"], "network": node["network"]})
        yield info
        yield GaugeMetricFamily("hyphae_uptime_seconds", "Seconds since the daemon started", value=node["uptime_s"])
        conns = GaugeMetricFamily("hyphae_connections", "Connected peers by connection type", labels=["type"])
        for kind in ("direct", "relayed"):
            conns.add_metric([kind], sum(1 for p in peers if p["connection"] == kind))
        yield conns
        rtt = GaugeMetricFamily("hyphae_peer_rtt_seconds", "Last measured round-trip time", labels=["peer"])
        for p in peers:
            if p["rtt_ms"] is not None:
                rtt.add_metric([p["peer_id"]], p["rtt_ms"] / 1000)
        yield rtt
        yield GaugeMetricFamily("hyphae_dht_routing_table_peers", "Peers in the Kad-DHT routing table",
                                value=node["routing_table_size"])
        yield from _bytes_metrics(snap.extras.get("traffic", []))
        yield from _training_metrics(snap.extras.get("training"))
        for name, value in sorted(snap.extras.get("counters", {}).items()):
            yield CounterMetricFamily(f"hyphae_{name}", name.replace("_", " "), value=value)


def _bytes_metrics(traffic: list[dict[str, Any]]) -> Iterator[Metric]:
    fam = CounterMetricFamily("hyphae_bytes", "Bytes moved, by plane, peer and direction",
                              labels=["plane", "peer", "direction"])
    for row in traffic:
        fam.add_metric([row["plane"], row["peer"], "sent"], row["sent"])
        fam.add_metric([row["plane"], row["peer"], "received"], row["received"])
    yield fam


def _training_metrics(t: dict[str, Any] | None) -> Iterator[Metric]:
    if t is None:
        return
    yield GaugeMetricFamily("hyphae_training_step", "Local optimizer steps done", value=t["step"] or 0)
    for key, help_text in (("loss", "Training loss (mean over the last log interval)"),
                           ("val_loss", "Latest validation loss"), ("tokens_per_s", "Training throughput")):
        if t.get(key) is not None:
            name = "hyphae_training_tokens_per_second" if key == "tokens_per_s" else f"hyphae_training_{key}"
            yield GaugeMetricFamily(name, help_text, value=t[key])
    yield CounterMetricFamily("hyphae_worker_restarts", "Training worker restarts", value=t["worker_restarts"])


def metrics_route(daemon: Daemon) -> Any:
    """An aiohttp route adder for ``GET /metrics``."""
    collector = _DaemonCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    async def metrics(_: web.Request) -> web.Response:
        node = await daemon.node_info()
        peers = await daemon.peers_info()
        collector.snapshot = _Snapshot(node, peers, await daemon.metric_extras())
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return lambda app: app.router.add_get("/metrics", metrics)

