"""The Docker testnets hold together: compose files, Dockerfile, entrypoint and healthcheck.

There is no Docker engine on CI, so the structure is checked here by reading the files (always),
and with the compose client's own ``config`` when a working client is installed (skipped,
naming the apt package, otherwise). The entrypoint's pure helpers are unit-tested by loading the script.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import _requires
import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[3] / "deploy"
REPO = DEPLOY.parent
COMPOSE_FILES = ["compose.yaml", "compose.nat.yaml", "compose.wan.yaml"]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / name).read_text())


def daemon_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the daemon (routers run the same image in router mode)."""
    return {name: svc for name, svc in doc["services"].items()
            if "HYPHAE_ROUTER_MASQUERADE" not in (svc.get("environment") or {})}


def networks_of(svc: dict[str, Any]) -> list[str]:
    nets = svc.get("networks") or []
    return list(nets) if isinstance(nets, (list, dict)) else []


def entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("hyphae_entrypoint", DEPLOY / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_every_daemon_service_has_an_api_healthcheck_and_known_networks(name: str) -> None:
    doc = load(name)
    declared = set(doc.get("networks") or {})
    daemons = daemon_services(doc)
    assert "bootstrap" in daemons
    for svc_name, svc in doc["services"].items():
        assert svc["image"] == "hyphae:cpu", svc_name
        assert set(networks_of(svc)) <= declared, f"{name}:{svc_name} uses an undeclared network"
        assert networks_of(svc), f"{name}:{svc_name} is on no network"
    for svc_name, svc in daemons.items():
        test = svc["healthcheck"]["test"]
        assert test == ["CMD", "hyphae-healthcheck"], f"{name}:{svc_name} healthcheck is {test}"
        assert "--config" in svc["command"] and "/etc/hyphae/testnet.toml" in svc["command"]
        if svc_name != "bootstrap":
            env = svc["environment"]
            assert env["HYPHAE_BOOTSTRAP_PEER_FILE"] == doc["services"]["bootstrap"]["environment"]["HYPHAE_PUBLISH_PEER_ID"]
            assert svc["depends_on"]["bootstrap"]["condition"] == "service_healthy"
    assert "--no-train" in daemons["bootstrap"]["command"]


def test_plain_testnet_scales_nodes_and_publishes_dashboards() -> None:
    doc = load("compose.yaml")
    node = doc["services"]["node"]
    assert node["deploy"]["replicas"] >= 2
    assert node["ports"] == ["7701-7764:7700"]  # a port range: `--scale node=N` gets one each
    assert doc["services"]["bootstrap"]["ports"] == ["7700:7700"]


def test_nat_testnet_private_nodes_reach_out_only_through_their_router() -> None:
    doc = load("compose.nat.yaml")
    services, networks = doc["services"], doc["networks"]
    public = ipaddress.ip_network(networks["public"]["ipam"]["config"][0]["subnet"])
    assert networks["public"].get("internal") is not True
    bootstrap_ip = services["bootstrap"]["networks"]["public"]["ipv4_address"]
    assert ipaddress.ip_address(bootstrap_ip) in public
    assert "relay" in services and "--no-train" in services["relay"]["command"]
    randomized = []
    for side in ("a", "b"):
        lan = f"lan-{side}"
        router, node = services[f"router-{side}"], services[f"node-{side}"]
        assert networks[lan]["internal"] is True
        subnet = ipaddress.ip_network(networks[lan]["ipam"]["config"][0]["subnet"])
        assert router["environment"]["HYPHAE_ROUTER_MASQUERADE"] == str(subnet)
        assert "NET_ADMIN" in router["cap_add"] and router["sysctls"]["net.ipv4.ip_forward"] == "1"
        assert set(router["networks"]) == {"public", lan}
        assert node["networks"] == [lan]  # no leg on the public network
        assert node["environment"]["HYPHAE_GATEWAY"] == router["networks"][lan]["ipv4_address"]
        assert node["environment"]["HYPHAE_BOOTSTRAP_HOST"] == bootstrap_ip  # no DNS across the NAT
        assert node["depends_on"][f"router-{side}"]["condition"] == "service_healthy"
        assert "NET_ADMIN" in node["cap_add"] and node["user"] == "root"
        randomized.append(router["environment"].get("HYPHAE_ROUTER_RANDOM") == "1")
    assert randomized == [False, True]  # one cone-like NAT, one symmetric-like


def test_wan_testnet_puts_netem_on_every_daemon() -> None:
    doc = load("compose.wan.yaml")
    for name, svc in daemon_services(doc).items():
        spec = svc["environment"]["HYPHAE_NETEM"]
        for word in ("delay", "loss", "rate"):
            assert word in spec, f"{name}: {spec}"
        assert "NET_ADMIN" in svc["cap_add"] and svc["user"] == "root"


def test_dockerfile_builds_in_two_stages_and_runs_unprivileged() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    build, _, runtime = text.partition("\n# ---- runtime stage")
    assert "AS build" in build and "libgmp-dev" in build and "gcc" in build
    assert "libgmp-dev" not in runtime and "gcc" not in runtime  # compilers stay in the build stage
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in build and "ARG TORCH_VERSION=2.13.0" in build
    assert "python:3.11-slim" in text
    assert "USER hyphae" in runtime and "useradd" in runtime
    assert 'ENTRYPOINT ["hyphae-entrypoint"]' in runtime
    assert 'HEALTHCHECK' in runtime and "hyphae-healthcheck" in runtime
    for line in text.splitlines():  # everything COPY'd from the context exists
        if line.startswith("COPY") and "--from" not in line:
            for src in line.split()[1:-1]:
                if not src.startswith("--"):
                    assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text()
    assert "!deploy/entrypoint.py" in ignored and "!deploy/healthcheck.py" in ignored


def test_testnet_training_config_is_valid() -> None:
    from hyphae.node.config import load_config

    config = load_config(file=DEPLOY / "testnet.toml", env={})
    assert config.training.preset == "tiny" and config.training.batch_size == 4


def test_entrypoint_builds_netem_and_masquerade_commands() -> None:
    ep = entrypoint()
    assert ep.netem_commands("delay 50ms loss 1%", ["eth0", "eth1"]) == [
        ["tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", "50ms", "loss", "1%"],
        ["tc", "qdisc", "replace", "dev", "eth1", "root", "netem", "delay", "50ms", "loss", "1%"],
    ]
    assert ep.netem_commands("  ", ["eth0"]) == []
    assert ep.masquerade_commands("10.31.2.0/24", ["eth1"], random_ports=True) == [
        ["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.31.2.0/24", "-o", "eth1", "-j", "MASQUERADE",
         "--random-fully"]]
    with pytest.raises(ValueError):
        ep.masquerade_commands("10.31.2.0/33", ["eth1"])


def test_entrypoint_waits_for_the_published_peer_id(tmp_path: Path) -> None:
    ep = entrypoint()
    peer_file = tmp_path / "bootstrap.peer"
    with pytest.raises(SystemExit, match="did not appear within 0 s"):
        ep.bootstrap_addr(peer_file, "127.0.0.1", 4101, wait_s=0.0)
    peer_file.write_text("12D3KooWTestPeer\n")
    assert ep.bootstrap_addr(peer_file, "127.0.0.1", 4101) == "/ip4/127.0.0.1/tcp/4101/p2p/12D3KooWTestPeer"


@pytest.mark.tools("docker-compose")
@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_client_accepts_the_file(name: str) -> None:
    client = _requires.find("docker-compose")  # `docker compose` (v2 plugin) or `docker-compose`
    assert client, "the tools marker skips this test without a compose client"
    done = subprocess.run([*client, "-f", str(DEPLOY / name), "config", "-q"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, f"{' '.join(client)} config rejected {name}:\n{done.stderr}"
