"""The daemon's configuration: defaults < TOML file < environment < command-line flags.

Every value is validated once, here, with a message that names the setting, the value and the fix.
Unknown keys in the file are errors (a typo must not be silently ignored).

File layout (all keys optional)::

    data_dir = "~/.local/share/hyphae"
    run = "default"             # the run to join (or create)
    log_level = "info"          # debug | info | warning | error
    log_json = false
    train = true

    [api]
    listen = "127.0.0.1:7700"   # port 0 picks a free port
    allowed_hosts = ["node.lan"]            # Host names the API answers to besides loopback
    cors_origins = ["https://tools.lan"]    # origins a browser may call the API from (token needed)

    [network]                   # see hyphae.protocol.config.HostConfig
    listen = ["/ip4/0.0.0.0/tcp/4101"]
    bootstrap = ["/ip4/192.0.2.1/tcp/4101/p2p/12D3KooW..."]
    mdns = true
    name = "hyphae"

Environment: ``HYPHAE_DATA_DIR``, ``HYPHAE_API``, ``HYPHAE_LISTEN`` and ``HYPHAE_BOOTSTRAP``
(comma-separated), ``HYPHAE_MDNS``, ``HYPHAE_TRAIN``, ``HYPHAE_LOG_LEVEL``, ``HYPHAE_LOG_JSON``,
``HYPHAE_NETWORK``, ``HYPHAE_RUN``, ``HYPHAE_RUN_OWNER``, ``HYPHAE_API_ALLOWED_HOSTS`` and
``HYPHAE_API_CORS_ORIGINS`` (comma-separated).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hyphae.protocol.config import HostConfig
from hyphae.protocol.errors import ConfigError, HyphaeError
from hyphae.protocol.runstate import check_peer_id, check_run_name

from .training_config import TrainConfig

__all__ = ["NodeConfig", "ApiAddress", "ApiAccess", "host_name", "load_config", "default_data_dir", "ConfigError",
           "HyphaeError"]

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LISTEN = ("/ip4/0.0.0.0/tcp/4101",)
DEFAULT_API = "127.0.0.1:7700"


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "hyphae"


@dataclass(frozen=True)
class ApiAddress:
    """Where the local HTTP API listens."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> ApiAddress:
        host, sep, port = text.rpartition(":")
        if not sep or not host:
            raise ConfigError(f"api address {text!r} must be HOST:PORT, e.g. 127.0.0.1:7700 (port 0 picks one)")
        try:
            number = int(port)
        except ValueError:
            raise ConfigError(f"api port {port!r} in {text!r} is not a number") from None
        if not 0 <= number <= 65535:
            raise ConfigError(f"api port must be 0-65535, got {number}")
        return cls(host.strip("[]"), number)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def host_name(text: str) -> str:
    """``text`` as one comparable host: lower case, no trailing dot, IPv6 without brackets.

    Raises:
        ValueError: not an IP address or a DNS name (a port, a path or a wildcard is not a host).
    """
    name = text.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    name = name.removesuffix(".")
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{text!r} is not a host name or IP address")
    return name


def _origin(text: str) -> str:
    """``scheme://host[:port]`` normalised as browsers send it in ``Origin``."""
    parts = urllib.parse.urlsplit(text.strip())
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme not in ("http", "https") or not parts.hostname or port == -1 \
            or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None:
        raise ValueError(f"{text!r} is not an origin; write scheme://host[:port], e.g. https://tools.lan:8443")
    host = host_name(parts.hostname)
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}" + (f":{port}" if port is not None else "")


@dataclass(frozen=True, kw_only=True)
class ApiAccess:
    """Who besides this machine's own tools may use the API (nobody, by default).

    The API can stop the node, so it answers only requests addressed to a loopback name
    (a page whose DNS name was re-pointed at 127.0.0.1 is refused) and sends no CORS headers:
    a web page the volunteer opens elsewhere can neither read it nor act through it.
    """

    allowed_hosts: tuple[str, ...] = ()
    """Host names (or addresses) besides loopback that requests may be addressed to, e.g. the
    machine's LAN name when the API binds beyond loopback. Exact names, any port."""
    cors_origins: tuple[str, ...] = ()
    """Origins (``https://tools.lan:8443``) whose pages may call the API from a browser; they get
    CORS headers and still need the API token to change anything."""

    def __post_init__(self) -> None:
        for key in ("allowed_hosts", "cors_origins"):
            value = getattr(self, key)
            if isinstance(value, str) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"api {key} must be a list of strings, got {value!r}")
            if any(v.strip() in ("*", "null") for v in value):
                raise ConfigError(f"api {key} may not contain '*' or 'null': that would let any web page the "
                                  f"volunteer opens read and drive the node; list each name")
        try:
            hosts = tuple(dict.fromkeys(host_name(h) for h in self.allowed_hosts))
            origins = tuple(dict.fromkeys(_origin(o) for o in self.cors_origins))
        except ValueError as exc:
            raise ConfigError(f"api access: {exc}") from None
        object.__setattr__(self, "allowed_hosts", hosts)
        object.__setattr__(self, "cors_origins", origins)


@dataclass(frozen=True, kw_only=True)
class NodeConfig:
    """Everything ``hyphae node join`` needs to run."""

    data_dir: Path = field(default_factory=default_data_dir)
    """Keys, peer book, run state and checkpoints live here."""
    api: ApiAddress = field(default_factory=lambda: ApiAddress.parse(DEFAULT_API))
    """The local HTTP API and dashboard. Binding beyond loopback requires the API token."""
    api_access: ApiAccess = field(default_factory=ApiAccess)
    """Extra Host names and CORS origins the API accepts (``[api] allowed_hosts``, ``cors_origins``)."""
    log_level: str = "info"
    """debug, info, warning or error."""
    log_json: bool = False
    """Write logs as one JSON object per line (for log collectors)."""
    train: bool = True
    """Run a training worker; false makes a network-only member (bootstrap, relay, DHT)."""
    host: HostConfig = field(default_factory=lambda: HostConfig(listen=DEFAULT_LISTEN))
    """The libp2p control plane."""
    training: TrainConfig = field(default_factory=TrainConfig)
    """What and how to train (ignored with train = false)."""
    run: str = "default"
    """The run this node joins, or creates if nobody has (state in DATA_DIR/runs/<run>/)."""
    run_owner: str | None = None
    """Pin the run owner's peer id (only it may change the run config); unpinned, the earliest
    creator owns the run."""
    run_secret_file: Path | None = None
    """Close the run with a pre-shared secret read from this file (or set ``HYPHAE_RUN_SECRET``):
    only peers that prove they know it are talked to. The secret never crosses the wire."""
    run_allowlist: Path | None = None
    """Close the run to the peer ids in this file, signed by the run's creator
    (``hyphae run allowlist``); its creator becomes the run owner."""

    def __post_init__(self) -> None:
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        try:
            check_run_name(self.run)
            if self.run_owner is not None:
                check_peer_id(self.run_owner, "run_owner")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


# ---- loading -------------------------------------------------------------------------------

_TOP_KEYS = {"data_dir", "log_level", "log_json", "train", "api", "network", "training", "run", "run_owner",
             "run_secret_file", "run_allowlist"}
_NETWORK_KEYS = {"listen", "announce", "bootstrap", "mdns", "dht_mode", "name", "target_peers",
                 "max_connections", "ping_interval_s", "discovery_interval_s", "dial_timeout_s",
                 "hello_deadline_s"}


def _check_keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; allowed: {', '.join(sorted(allowed))}")


def _bool(text: str, name: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} must be true or false, got {text!r}")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _from_file(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    _check_keys(data, _TOP_KEYS, str(path))
    flat: dict[str, Any] = {k: v for k, v in data.items() if k not in ("api", "network", "training")}
    api = data.get("api", {})
    _check_keys(api, {"listen", "allowed_hosts", "cors_origins"}, f"[api] of {path}")
    if "listen" in api:
        flat["api"] = api["listen"]
    for key in ("allowed_hosts", "cors_origins"):
        if key in api:
            flat[f"api.{key}"] = api[key]
    network = data.get("network", {})
    _check_keys(network, _NETWORK_KEYS, f"[network] of {path}")
    flat.update({f"net.{k}": v for k, v in network.items()})
    if "training" in data:
        flat["training"] = data["training"]
    return flat


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    simple = {"HYPHAE_DATA_DIR": "data_dir", "HYPHAE_API": "api", "HYPHAE_LOG_LEVEL": "log_level",
              "HYPHAE_NETWORK": "net.name", "HYPHAE_RUN": "run", "HYPHAE_RUN_OWNER": "run_owner",
              "HYPHAE_RUN_SECRET_FILE": "run_secret_file", "HYPHAE_RUN_ALLOWLIST": "run_allowlist"}
    for var, key in simple.items():
        if env.get(var):
            out[key] = env[var]
    for var, key in {"HYPHAE_LISTEN": "net.listen", "HYPHAE_BOOTSTRAP": "net.bootstrap",
                     "HYPHAE_API_ALLOWED_HOSTS": "api.allowed_hosts", "HYPHAE_API_CORS_ORIGINS": "api.cors_origins"}.items():
        if env.get(var):
            out[key] = _split(env[var])
    for var, key in {"HYPHAE_MDNS": "net.mdns", "HYPHAE_TRAIN": "train", "HYPHAE_LOG_JSON": "log_json"}.items():
        if var in env:
            out[key] = _bool(env[var], var)
    return out


def load_config(*, file: Path | None = None, env: Mapping[str, str] | None = None,
                flags: Mapping[str, Any] | None = None) -> NodeConfig:
    """Merge the layers and validate the result.

    Args:
        file: a TOML file (``--config``), or None.
        env: the environment (default ``os.environ``).
        flags: values given on the command line, keyed like the merged layers
            (``data_dir``, ``api``, ``log_level``, ``log_json``, ``train``, ``net.listen``,
            ``net.bootstrap``, ``net.mdns``, ``net.name``, ``training.<field>``); None entries are
            ignored.

    Raises:
        ConfigError: the first invalid value, with what to fix.
    """
    merged: dict[str, Any] = {}
    if file is not None:
        merged.update(_from_file(Path(file).expanduser()))
    merged.update(_from_env(os.environ if env is None else env))
    training_overrides: dict[str, Any] = {}
    for key, value in (flags or {}).items():
        if value is None:
            continue
        if key.startswith("training."):
            training_overrides[key.removeprefix("training.")] = value
        else:
            merged[key] = value
    return _build(merged, training_overrides)


def _build(merged: dict[str, Any], training_overrides: dict[str, Any]) -> NodeConfig:
    net = {k.removeprefix("net."): v for k, v in merged.items() if k.startswith("net.")}
    if "name" in net:
        net["network"] = net.pop("name")
    for key in ("listen", "announce", "bootstrap"):
        if isinstance(net.get(key), str):
            net[key] = [net[key]]  # one address may be written without the list; HostConfig checks the rest
    net.setdefault("listen", DEFAULT_LISTEN)
    try:
        host = HostConfig(**net)
    except TypeError as exc:
        raise ConfigError(f"network settings: {exc}") from None
    training_table = dict(merged.get("training") or {})
    training_table.update(training_overrides)
    kwargs: dict[str, Any] = {"host": host, "training": TrainConfig.from_dict(training_table)}
    if "data_dir" in merged:
        kwargs["data_dir"] = Path(str(merged["data_dir"])).expanduser()
    for key in ("run_secret_file", "run_allowlist"):
        if merged.get(key) is not None:
            if not isinstance(merged[key], str | Path):
                raise ConfigError(f"{key} must be a file path, got {merged[key]!r}")
            kwargs[key] = Path(str(merged[key])).expanduser()
    if "api" in merged:
        kwargs["api"] = ApiAddress.parse(str(merged["api"]))
    access = {k.removeprefix("api."): v for k, v in merged.items() if k.startswith("api.")}
    for key, value in access.items():
        if not isinstance(value, list | tuple):
            raise ConfigError(f"[api] {key} must be a list of strings, got {value!r}")
    kwargs["api_access"] = ApiAccess(**{k: tuple(v) for k, v in access.items()})
    for key, kind in (("log_level", str), ("log_json", bool), ("train", bool), ("run", str), ("run_owner", str)):
        if key in merged:
            value = merged[key]
            if not isinstance(value, kind):
                raise ConfigError(f"{key} must be {kind.__name__}, got {value!r}")
            kwargs[key] = value.lower() if key == "log_level" else value
    return NodeConfig(**kwargs)


def config_to_json(config: NodeConfig) -> dict[str, Any]:
    """The effective configuration as plain JSON data, for ``/api/v1/node`` and logs."""
    return _plain(dataclasses.asdict(config) | {"api": str(config.api)})


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
