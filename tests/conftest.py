"""Fixtures: the real proxy on 127.0.0.1 with an ephemeral port, a fake
upstream over real HTTP, and a fresh SQLite file per test."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import yaml
from aiohttp import web

from keystile.config import load_config
from keystile.server import start

from .fakes import FakeUpstream

MASTER_KEY = "sk-test-master-key-0123456789"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("KEYSTILE_", "OPENAI_")):
            monkeypatch.delenv(name)


@contextlib.asynccontextmanager
async def write_lock(db_path: Path) -> AsyncIterator[None]:
    """Another connection holds the database's write lock while the block runs."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        with sqlite3.connect(db_path, timeout=1) as db:
            db.execute("BEGIN IMMEDIATE")
            locked.set()
            release.wait(20)
            db.rollback()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert await asyncio.to_thread(locked.wait, 5), "the lock was not taken"
        yield
    finally:
        release.set()
        await asyncio.to_thread(holder.join, 20)


class Proxy:
    """A running proxy and the ways tests talk to it."""

    def __init__(self, runner: web.AppRunner, port: int, config_path: Path,
                 db_path: Path, session: aiohttp.ClientSession) -> None:
        self.runner = runner
        self.url = f"http://127.0.0.1:{port}"
        self.config_path = config_path
        self.db_path = db_path
        self.session = session
        self.master_key = MASTER_KEY
        self.clients: list[openai.AsyncOpenAI] = []

    async def request(self, method: str, path: str, *, key: str | None = None,
                      json: Any = None, data: bytes | None = None,
                      headers: dict[str, str] | None = None,
                      ) -> tuple[int, Any, aiohttp.typedefs.LooseHeaders]:
        headers = dict(headers or {})
        if key is not None:
            headers["Authorization"] = f"Bearer {key}"
        if json is not None:
            data = orjson.dumps(json)
            headers.setdefault("Content-Type", "application/json")
        payload = io.BytesIO(data) if data and len(data) > 1 << 20 else data
        async with self.session.request(method, self.url + path, data=payload,
                                        headers=headers) as response:
            raw = await response.read()
            try:
                body = orjson.loads(raw)
            except orjson.JSONDecodeError:
                body = raw
            return response.status, body, response.headers

    async def admin(self, path: str, json: Any = None, method: str = "POST") -> Any:
        status, body, _ = await self.request(method, path, key=self.master_key, json=json)
        assert status == 200, (status, body)
        return body

    async def generate(self, **fields: Any) -> str:
        """A new virtual key's raw value."""
        body = await self.admin("/key/generate", fields)
        return str(body["key"])

    def openai(self, key: str) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(api_key=key, base_url=self.url, max_retries=0)
        self.clients.append(client)
        return client

    async def stop(self) -> None:
        for client in self.clients:
            await client.close()
        await self.runner.cleanup()


def base_config(upstream: FakeUpstream | None, **general: Any) -> dict[str, Any]:
    models: list[dict[str, Any]] = [
        {"model_name": "mock-model", "litellm_params": {"model": "mock/mock-model-0001"}},
    ]
    if upstream is not None:
        models.insert(0, {
            "model_name": "gpt-3.5-turbo",
            "litellm_params": {
                "model": "openai/gpt-3.5-turbo-0125",
                "api_base": f"{upstream.url}/v1",
                "api_key": "sk-upstream-secret-0000",
            },
        })
    settings = {
        "master_key": MASTER_KEY,
        "service_account_settings": {"enforced_params": ["user"]},
    } | general
    return {"model_list": models, "general_settings": settings}


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = await FakeUpstream().start()
    yield fake
    await fake.stop()


@pytest.fixture
async def make_upstream() -> AsyncIterator[Callable[[], Awaitable[FakeUpstream]]]:
    """More fake upstreams, one per deployment; all stopped at teardown."""
    started: list[FakeUpstream] = []

    async def make() -> FakeUpstream:
        fake = await FakeUpstream().start()
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


MakeProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
async def make_proxy(tmp_path: Path) -> AsyncIterator[MakeProxy]:
    """Start a proxy from a config dict; every one is stopped at teardown."""
    started: list[Proxy] = []
    session = aiohttp.ClientSession()

    async def make(config: dict[str, Any], *, reload_interval: float = 0.2,
                   name: str = "config.yaml") -> Proxy:
        config_path = tmp_path / name
        config_path.write_text(yaml.safe_dump(config))
        db_path = tmp_path / "keys.db"
        loaded = load_config(config_path, str(db_path))
        runner, port = await start(loaded, "127.0.0.1", 0, reload_interval=reload_interval)
        proxy = Proxy(runner, port, config_path, db_path, session)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        await proxy.stop()
    await session.close()


@pytest.fixture
async def proxy(make_proxy: MakeProxy, upstream: FakeUpstream) -> Proxy:
    return await make_proxy(base_config(upstream))
