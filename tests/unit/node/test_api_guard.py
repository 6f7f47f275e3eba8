"""The API guard's pure parts: which Host headers are this node, which origins are its own."""

from __future__ import annotations

import pytest

from hyphae.node.api_guard import ApiGuard, _header_host, _origin_of
from hyphae.node.config import ApiAccess


def _guard(bind: str, **access: tuple[str, ...]) -> ApiGuard:
    return ApiGuard(token="t", csrf_token="c", bind_host=bind, access=ApiAccess(**access))


@pytest.mark.parametrize(("header", "host"), [
    ("127.0.0.1:7700", "127.0.0.1"), ("LocalHost.:80", "localhost"), ("[::1]:7700", "::1"), ("[::1]", "::1"),
    ("node.lan", "node.lan"), ("evil.example:7700:1", None), ("127.0.0.1@evil.example", None), ("", None),
    ("[::1", None), ("[::1]x", None), ("a b", None), ("node.lan:", "node.lan"),
])
def test_host_headers_parse_to_one_comparable_name_or_none(header: str, host: str | None) -> None:
    assert _header_host(header) == host


def test_loopback_bind_accepts_loopback_names_and_allowed_hosts_only() -> None:
    guard = _guard("127.0.0.1", allowed_hosts=("Node.Lan.",))
    assert all(guard.host_allowed(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "localhost", "node.lan"))
    assert not any(guard.host_allowed(h) for h in ("evil.example", "localhost.evil.example", "192.0.2.7", "::"))


def test_a_named_bind_address_passes_and_a_wildcard_bind_passes_ip_literals_but_not_names() -> None:
    assert _guard("192.0.2.7").host_allowed("192.0.2.7") and not _guard("192.0.2.7").host_allowed("192.0.2.8")
    wildcard = _guard("0.0.0.0")
    assert wildcard.host_allowed("192.0.2.8") and wildcard.host_allowed("2001:db8::1")
    assert not wildcard.host_allowed("evil.example")


def test_referer_origins_drop_path_and_credentials() -> None:
    assert _origin_of("http://user:pw@Evil.Example:81/a/b?c") == "http://evil.example:81"
    assert _origin_of("not a url") is None
