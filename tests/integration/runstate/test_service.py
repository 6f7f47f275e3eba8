"""The run state inside real daemons (in-process): the API, owner-only config, the CLI."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from hyphae.cli.run_cmd import add_run_parser, run_command
from hyphae.node.client import ApiClient
from hyphae.node.config import ApiAddress, NodeConfig
from hyphae.node.daemon import Daemon
from hyphae.node.runstate_service import RunStateService, run_config_set, run_show, run_state_path
from hyphae.protocol.config import HostConfig
from hyphae.protocol.errors import HyphaeError
from hyphae.protocol.runstate import SyncConfig
from hyphae.protocol.testing import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

RUN = "svc-test"


@asynccontextmanager
async def daemon(data_dir: Path, bootstrap: tuple[str, ...] = (), **service: Any) -> AsyncIterator[Daemon]:
    config = NodeConfig(data_dir=data_dir, api=ApiAddress("127.0.0.1", 0), train=False,
                        host=HostConfig(listen=("/ip4/127.0.0.1/tcp/0",), mdns=False, bootstrap=bootstrap))
    sync = SyncConfig(create_if_missing=True, create_after_s=0.5, **service.pop("sync", {}))
    d = Daemon(config, services=[lambda dm: RunStateService(dm, run=RUN, sync=sync, **service)])
    ready = asyncio.Event()
    async with asyncio.TaskGroup() as group:
        task = group.create_task(d.run(on_ready=lambda info: ready.set()))
        await ready.wait()
        try:
            yield d
        finally:
            d.request_stop("test over")
            await task


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_run_parser(parser.add_subparsers(dest="command"))
    return run_command(parser.parse_args(list(argv)))


async def test_the_api_shows_the_run_and_only_the_owner_sets_config(tmp_path: Path, capsys) -> None:
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(daemon(tmp_path / "a", initial_config={"algorithm": "diloco"}))
        b = await stack.enter_async_context(daemon(tmp_path / "b", bootstrap=(a.host.addrs[0],)))
        ca, cb = (ApiClient(d.api_url, token=d.datadir.api_token()) for d in (a, b))  # as the CLI: with the token
        call = lambda fn, *args: asyncio.to_thread(fn, *args)  # noqa: E731 — urllib blocks

        async def both_live() -> bool:
            views = [await call(run_show, c) for c in (ca, cb)]
            return all(v["counts"]["live"] == 2 and v["owner"] == a.host.peer_id and v["config"] for v in views)

        await wait_for(both_live, 20, "both daemons live in the run, owned by a, with its initial config")
        view = await call(run_show, cb)
        assert view["run"] == RUN and view["config"] == {"algorithm": "diloco"} and not view["is_owner"]
        me = next(m for m in view["members"] if m["peer_id"] == b.host.peer_id)
        assert me["roles"] == ["network"] and me["hardware"]["cpus"] >= 1 and me["addrs"] == b.host.addrs

        result = await call(run_config_set, ca, {"lr": 0.5, "warmup": True})
        assert result["config"]["lr"] == 0.5
        await wait_for(lambda: _config_on(cb, "lr", 0.5), 10, "lr=0.5 on b")
        with pytest.raises(HyphaeError, match="HTTP 403.*only the run owner"):
            await call(run_config_set, cb, {"lr": 9})

        assert await call(cli, "run", "config", "set", "batch=16", "name=tiny run", "--api", a.api_url,
                          "--data-dir", str(tmp_path / "a")) == 0
        assert "batch = 16" in capsys.readouterr().out
        await wait_for(lambda: _config_on(cb, "name", "tiny run"), 10, "the CLI's write on b")
        assert await call(cli, "run", "show", "--json", "--api", b.api_url) == 0
        shown = json.loads(capsys.readouterr().out)
        assert shown["config"] == {"algorithm": "diloco", "batch": 16, "lr": 0.5, "name": "tiny run", "warmup": True}
        assert await call(cli, "run", "show", "--api", b.api_url) == 0
        text = capsys.readouterr().out
        assert "owner" in text and "live" in text and "batch" in text
    # a clean stop saved the state where the lead's wiring will look for it
    assert run_state_path(tmp_path / "b", RUN).stat().st_size > 0


async def _config_on(client: ApiClient, key: str, value: Any) -> bool:
    view = await asyncio.to_thread(run_show, client)
    return view["config"].get(key) == value
