"""``POST /api/v1/run/config`` with hostile bodies: every one gets a 2xx/4xx with a JSON reason —
never a 500, never a body read past its limit."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hyphae.node.api import MAX_JSON_DEPTH, read_json
from hyphae.node.runstate_service import MAX_CONFIG_BODY_BYTES, RunStateService
from hyphae.protocol.identity import Identity


def _service(tmp_path) -> RunStateService:
    identity = Identity.generate()
    host = SimpleNamespace(identity=identity, peer_id=identity.peer_id, addrs=[])
    daemon = SimpleNamespace(host=host, datadir=SimpleNamespace(root=tmp_path),
                             config=SimpleNamespace(run="r", run_owner=None, train=False))
    svc = RunStateService(daemon)
    svc.state.create_run()  # this node owns the run, so bodies reach set_config
    return svc


async def _post_all(tmp_path, bodies: list[bytes], headers: dict | None = None) -> list[tuple[int, dict]]:
    app = web.Application(client_max_size=1 << 20)
    svc = _service(tmp_path)
    svc._add_routes(app)
    out = []
    async with TestClient(TestServer(app)) as client:
        for body in bodies:
            resp = await client.post("/api/v1/run/config", data=body, headers=headers)
            out.append((resp.status, await resp.json(content_type=None)))
    return out


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=70), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.one_of(
    st.binary(max_size=100),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.text(max_size=70), json_values, max_size=6).map(lambda d: json.dumps({"set": d}).encode()),
), min_size=60, max_size=100))  # one server per batch: ~500 bodies in all
def test_any_body_gets_a_json_answer_never_a_500(tmp_path, bodies: list[bytes]) -> None:
    for status, answer in asyncio.run(_post_all(tmp_path, bodies)):
        assert status in (200, 400, 403, 409, 413), (status, answer)
        assert ("ok" in answer) if status == 200 else isinstance(answer.get("error"), str)


def test_oversized_deep_and_chunked_bodies_are_refused_with_reasons(tmp_path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    nested = json.dumps({"set": {"k": json.loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1))}}).encode()
    big = json.dumps({"set": {"k": "x" * MAX_CONFIG_BODY_BYTES}}).encode()
    answers = asyncio.run(_post_all(tmp_path, [deep, nested, big, b"\xff\xfe", b'{"set": {"lr": 0.1}}']))
    assert [s for s, _ in answers] == [413, 400, 413, 400, 200]
    assert "deeper" in answers[1][1]["error"] and "limit" in answers[2][1]["error"]

    async def chunked() -> int:  # no Content-Length: the limit still holds while reading
        async def gen():
            for _ in range(40):
                yield b" " * 4096

        app = web.Application()

        async def handler(request: web.Request) -> web.Response:
            await read_json(request, limit=MAX_CONFIG_BODY_BYTES)
            return web.json_response({"ok": True})

        app.router.add_post("/x", handler)
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/x", data=gen())
            return resp.status

    assert asyncio.run(chunked()) == 413


def test_nan_in_a_config_value_is_refused_not_stored(tmp_path) -> None:
    [(status, answer)] = asyncio.run(_post_all(tmp_path, [b'{"set": {"lr": NaN}}']))
    assert status == 400, answer
