"""Node configuration: defaults < file < environment < flags; unknown keys and bad values refused."""

from pathlib import Path

import pytest

from hyphae.node.config import ApiAddress, ConfigError, load_config

PEER = "12D3KooWEKNUC8Jm9GdhVLi4rygDH8NrnDzq7vcJNcJi9E9z4iym"
BOOT = f"/ip4/127.0.0.1/tcp/4101/p2p/{PEER}"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "hyphae.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path) -> None:
    cfg = load_config(env={})
    assert cfg.train and cfg.host.mdns and str(cfg.api) == "127.0.0.1:7700"
    assert cfg.host.listen == ("/ip4/0.0.0.0/tcp/4101",)


def test_layers_override_in_order(tmp_path) -> None:
    path = write(tmp_path, f'log_level = "warning"\n[api]\nlisten = "127.0.0.1:1"\n[network]\nbootstrap = ["{BOOT}"]\nmdns = false\n')
    cfg = load_config(file=path, env={"HYPHAE_API": "127.0.0.1:2", "HYPHAE_MDNS": "1"}, flags={"api": "127.0.0.1:3"})
    assert cfg.log_level == "warning"
    assert cfg.host.bootstrap == (BOOT,)
    assert cfg.host.mdns is True  # env beats file
    assert cfg.api.port == 3  # flag beats env


def test_env_lists_are_comma_separated() -> None:
    cfg = load_config(env={"HYPHAE_BOOTSTRAP": f"{BOOT}, {BOOT}", "HYPHAE_TRAIN": "no"})
    assert cfg.host.bootstrap == (BOOT, BOOT) and cfg.train is False


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("colour = 1\n", "unknown key"),
        ("[network]\nlistn = []\n", r"unknown key\(s\) listn in \[network\]"),
        ("[network]\nbootstrap = ['/ip4/1.2.3.4/tcp/1']\n", "lacks the peer id"),
        ("log_level = 'loud'\n", "log_level must be one of"),
        ("train = 'yes'\n", "train must be bool"),
        ("[api]\nlisten = 'nohost'\n", "must be HOST:PORT"),
        ("[training]\nalgorithm = 'magic'\n", "algorithm must be one of"),
        ("[training]\nmax_steps = -1\n", "max_steps must be >= 0"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_file_errors_name_the_setting(tmp_path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(file=write(tmp_path, text), env={})


def test_bad_env_boolean_is_refused() -> None:
    with pytest.raises(ConfigError, match="HYPHAE_MDNS must be true or false"):
        load_config(env={"HYPHAE_MDNS": "maybe"})


def test_missing_config_file_is_reported(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(file=tmp_path / "nope.toml", env={})


def test_api_address_loopback_detection() -> None:
    assert ApiAddress.parse("127.0.0.1:0").is_loopback
    assert ApiAddress.parse("localhost:80").is_loopback
    assert not ApiAddress.parse("0.0.0.0:80").is_loopback
    with pytest.raises(ConfigError, match="0-65535"):
        ApiAddress.parse("127.0.0.1:70000")


def test_effective_config_is_plain_json_even_with_paths(tmp_path) -> None:
    import json

    from hyphae.node.config import config_to_json

    cfg = load_config(env={}, flags={"training.data": tmp_path / "corpus.txt", "data_dir": tmp_path})
    text = json.dumps(config_to_json(cfg))
    assert str(tmp_path / "corpus.txt") in text and '"api": "127.0.0.1:7700"' in text


def test_api_access_lists_are_normalised_from_file_and_env(tmp_path) -> None:
    path = write(tmp_path, '[api]\nallowed_hosts = ["Node.LAN.", "[::1]"]\ncors_origins = ["HTTPS://Tools.lan:8443/"]\n')
    cfg = load_config(file=path, env={})
    assert cfg.api_access.allowed_hosts == ("node.lan", "::1")
    assert cfg.api_access.cors_origins == ("https://tools.lan:8443",)
    env = load_config(env={"HYPHAE_API_ALLOWED_HOSTS": "a.lan, b.lan", "HYPHAE_API_CORS_ORIGINS": "http://x.lan"})
    assert env.api_access.allowed_hosts == ("a.lan", "b.lan") and env.api_access.cors_origins == ("http://x.lan",)
    assert load_config(env={}).api_access.allowed_hosts == ()


@pytest.mark.parametrize(("text", "match"), [
    ('[api]\nallowed_hosts = ["*"]\n', "may not contain '\\*'"),
    ('[api]\ncors_origins = ["null"]\n', "may not contain"),
    ('[api]\nallowed_hosts = ["node.lan:80"]\n', "not a host name"),
    ('[api]\nallowed_hosts = "node.lan"\n', "must be a list of strings"),
    ('[api]\ncors_origins = ["tools.lan"]\n', "is not an origin"),
    ('[api]\ncors_origins = ["https://tools.lan/app"]\n', "is not an origin"),
    ('[api]\ncors_origins = ["ftp://tools.lan"]\n', "is not an origin"),
    ('[api]\ncors_origin = []\n', r"unknown key\(s\) cors_origin in \[api\]"),
])
def test_bad_api_access_entries_are_refused_with_what_to_write(tmp_path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(file=write(tmp_path, text), env={})
