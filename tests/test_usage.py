"""The usage ledger: one row per authenticated request, tokens from JSON and
SSE answers, estimates for cut-off streams, cost, and the write-behind
path's promises (200 ms, flushed on shutdown)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml

from .conftest import MASTER_KEY, MakeProxy, Proxy, base_config, write_lock
from .fakes import FakeUpstream, Script, sse_chunks
from .routes import chat as routed_chat
from .routes import config as routed_config
from .routes import deployment
from .test_limits import CHAT, chat, priced_config, wait_for

REPO = Path(__file__).resolve().parent.parent


def ledger(db_path: Path) -> list[dict[str, Any]]:
    """The usage table as another process sees it: only what is committed."""
    connection = sqlite3.connect(db_path)
    connection.row_factory = sqlite3.Row
    try:
        return [dict(row) for row in connection.execute("SELECT * FROM usage ORDER BY id")]
    finally:
        connection.close()


async def rows(proxy: Proxy, count: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []

    async def enough() -> bool:
        found[:] = ledger(proxy.db_path)
        return len(found) >= count

    await wait_for(enough)
    return found


def events(raw: bytes) -> list[Any]:
    out = []
    for block in raw.split(b"\n\n"):
        if block.startswith(b"data: "):
            data = block[6:]
            out.append(data.decode() if data == b"[DONE]" else orjson.loads(data))
    return out


async def test_every_authenticated_request_is_in_the_ledger(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate(key_alias="team-a", models=["gpt-3.5-turbo"])

    assert (await chat(proxy, key, user="alice"))[0] == 200
    assert (await chat(proxy, key, model="mock-model"))[0] == 403
    upstream.script.status = 500
    upstream.script.body = b'{"error": {"message": "boom", "type": "server_error"}}'
    assert (await chat(proxy, key, user="bob"))[0] == 500
    assert (await chat(proxy, "sk-not-a-key-at-all-0000"))[0] == 401
    assert (await chat(proxy, MASTER_KEY, model="mock-model"))[0] == 200

    # A body that is not JSON: still the key's request, still a row; and a
    # bad key is told so whatever its body.
    assert (await proxy.request("POST", "/chat/completions", key=key, data=b"{bad json",
                                headers={"Content-Type": "application/json"}))[0] == 400
    assert (await proxy.request("POST", "/chat/completions", key="sk-not-a-key-at-all-0000",
                                data=b"[1, 2]"))[0] == 401

    ok, forbidden, failed, master, unreadable = await rows(proxy, 5)
    assert len(ledger(proxy.db_path)) == 5
    info = await proxy.admin(f"/key/info?key={key}", method="GET")
    assert ok["key_hash"] == info["key"]
    assert ok["key_alias"] == "team-a"
    assert ok["account_type"] == "user"
    assert ok["end_user"] == "alice"
    assert ok["endpoint"] == "chat/completions"
    assert ok["model_group"] == "gpt-3.5-turbo"
    assert ok["deployment_id"]
    assert (ok["status"], ok["prompt_tokens"], ok["completion_tokens"]) == (200, 9, 12)
    assert ok["estimated"] == 0
    assert 0 < ok["ttfb_ms"] <= ok["latency_ms"]
    assert ok["time"].endswith("Z")
    assert (forbidden["status"], forbidden["prompt_tokens"]) == (403, 0)
    assert forbidden["deployment_id"] is None
    assert (failed["status"], failed["prompt_tokens"], failed["estimated"]) == (500, 0, 0)
    assert failed["end_user"] == "bob"
    assert master["account_type"] == "master"
    assert master["key_hash"] is None
    assert master["prompt_tokens"] > 0
    assert (unreadable["status"], unreadable["key_alias"]) == (400, "team-a")
    assert unreadable["model_group"] is None and unreadable["prompt_tokens"] == 0


async def test_stream_usage_is_asked_for_and_hidden_from_a_client_that_did_not(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate()

    status, raw, _ = await chat(proxy, key, stream=True)

    assert status == 200
    assert upstream.received[0].json["stream_options"] == {"include_usage": True}
    seen = events(raw)
    assert seen[-1] == "[DONE]"
    assert all("usage" not in chunk or chunk["choices"] for chunk in seen[:-1])
    assert [c["choices"][0]["delta"].get("content") for c in seen[:-1]] == [
        "Hello", " there", "!", None]
    (row,) = await rows(proxy, 1)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (5, 3, 0)


async def test_stream_usage_reaches_a_client_that_asked(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate()
    client = proxy.openai(key)

    stream = await client.chat.completions.create(
        model="gpt-3.5-turbo", messages=CHAT["messages"], stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]

    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 8
    (row,) = await rows(proxy, 1)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (5, 3)


async def test_mock_stream_is_metered_like_an_upstream_one(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(base_config(None))
    key = await proxy.generate()

    status, raw, _ = await chat(proxy, key, model="mock-model", stream=True)

    assert status == 200
    assert all("usage" not in chunk for chunk in events(raw)[:-1])
    (row,) = await rows(proxy, 1)
    assert row["estimated"] == 0
    assert row["prompt_tokens"] == 1 and row["completion_tokens"] > 0


async def test_a_deployment_can_opt_out_of_stream_usage(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    config = base_config(upstream)
    config["model_list"][0]["litellm_params"]["stream_usage"] = False
    proxy = await make_proxy(config)
    key = await proxy.generate()

    assert (await chat(proxy, key, stream=True))[0] == 200

    assert "stream_options" not in upstream.received[0].json
    (row,) = await rows(proxy, 1)
    # "hello" is 5 characters and "Hello there!" 12: about 2 and 3 tokens.
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (2, 3, 1)


async def test_a_stream_cut_off_by_the_upstream_is_estimated_and_charged(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(priced_config(upstream))
    key = await proxy.generate()
    upstream.script.break_after = 2

    status, raw, _ = await chat(proxy, key, stream=True)

    assert status == 200
    assert events(raw)[-1]["error"]["type"] == "upstream_error"
    (row,) = await rows(proxy, 1)
    # "Hello there" (11 characters) arrived before the break.
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (2, 3, 1)
    assert row["cost"] == pytest.approx(2 * 0.001 + 3 * 0.002)
    info = await proxy.admin(f"/key/info?key={key}", method="GET")
    assert info["info"]["spend"] == pytest.approx(row["cost"])


async def test_a_long_cut_off_stream_is_estimated_from_all_it_relayed(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    # Enough text that the estimate is counted in several parts along the way.
    words = ["word " * 200] * 500  # 500 events of 1,000 characters each
    upstream.script.chunks = sse_chunks("gpt-3.5-turbo", words)
    upstream.script.break_after = 400
    proxy = await make_proxy(priced_config(upstream))
    key = await proxy.generate()

    status, raw, _ = await chat(proxy, key, stream=True)

    assert status == 200
    assert events(raw)[-1]["error"]["type"] == "upstream_error"
    (row,) = await rows(proxy, 1)
    assert (row["completion_tokens"], row["estimated"]) == (400 * 1000 // 4, 1)


async def test_a_client_hanging_up_mid_stream_is_still_recorded(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate()
    upstream.script.chunk_delay = 0.3

    async with aiohttp.ClientSession() as session:
        async with session.post(
            proxy.url + "/chat/completions", json=CHAT | {"stream": True},
            headers={"Authorization": f"Bearer {key}"},
        ) as response:
            first = await response.content.readuntil(b"\n\n")
    assert b"Hello" in first

    (row,) = await rows(proxy, 1)
    assert row["status"] == 499
    assert row["estimated"] == 1
    assert row["completion_tokens"] >= 1
    assert row["prompt_tokens"] == 2


async def test_cost_is_tokens_times_the_deployment_prices(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(priced_config(upstream))
    key = await proxy.generate()

    for _ in range(3):
        assert (await chat(proxy, key))[0] == 200
    embeddings = await proxy.request(
        "POST", "/embeddings", key=key,
        json={"model": "gpt-3.5-turbo", "input": "hi"},
    )

    assert embeddings[0] == 200
    found = await rows(proxy, 4)
    assert [row["cost"] for row in found[:3]] == [9 * 0.001 + 12 * 0.002] * 3
    token = found[0]["key_hash"]
    connection = sqlite3.connect(proxy.db_path)
    spend = connection.execute("SELECT spend FROM keys WHERE token = ?", (token,)).fetchone()
    connection.close()
    assert spend[0] == pytest.approx(sum(row["cost"] for row in found))


async def test_a_row_is_durable_within_200_ms_of_the_response(proxy: Proxy) -> None:
    key = await proxy.generate()
    worst = 0.0

    for count in range(1, 6):
        assert (await chat(proxy, key))[0] == 200
        ended = time.monotonic()
        while len(ledger(proxy.db_path)) < count:
            assert time.monotonic() - ended < 1.0
            await asyncio.sleep(0.005)
        worst = max(worst, time.monotonic() - ended)

    assert worst < 0.2


@pytest.mark.parametrize("signum, locked", [
    (signal.SIGTERM, False), (signal.SIGINT, False),
    # Another process holds the file for longer than one busy timeout.
    (signal.SIGTERM, True),
])
async def test_shutdown_writes_everything_queued(
    tmp_path: Path, signum: int, locked: bool
) -> None:
    config = base_config(None) | {}
    config["general_settings"]["proxy_batch_write_at"] = 60  # only shutdown writes
    config["model_list"][0]["model_info"] = {"input_cost_per_token": 0.5}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    db = tmp_path / "keys.db"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "proxy.py"), "--config", str(tmp_path / "config.yaml"),
         "--db", str(db), "--host", "127.0.0.1", "--port", "0"],
        stderr=subprocess.PIPE, text=True, env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stderr is not None
        url = None
        while url is None:
            line = await asyncio.to_thread(process.stderr.readline)
            assert line, "the proxy exited before listening"
            if "listening on" in line:
                url = line.split("listening on ")[1].split()[0]
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/key/generate", json={},
                                    headers={"Authorization": f"Bearer {MASTER_KEY}"}) as r:
                key = (await r.json())["key"]
            for _ in range(5):
                async with session.post(
                    url + "/chat/completions", json=CHAT | {"model": "mock-model"},
                    headers={"Authorization": f"Bearer {key}"},
                ) as response:
                    assert response.status == 200
        assert ledger(db) == []

        async with contextlib.AsyncExitStack() as stack:
            if locked:
                await stack.enter_async_context(write_lock(db))
            process.send_signal(signum)
            while locked:
                line = await asyncio.to_thread(process.stderr.readline)
                assert line, "the proxy exited while the file was locked"
                locked = "trying again" not in line
        assert await asyncio.to_thread(process.wait, 15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stderr is not None:
            process.stderr.close()

    found = ledger(db)
    assert len(found) == 5
    connection = sqlite3.connect(db)
    spend = connection.execute("SELECT spend FROM keys").fetchone()[0]
    connection.close()
    assert spend == pytest.approx(sum(row["prompt_tokens"] * 0.5 for row in found))
    assert spend > 0


async def test_a_fallback_to_a_server_without_stream_usage_is_not_sent_the_option(
    make_proxy: MakeProxy, make_upstream: Any
) -> None:
    first, second = await make_upstream(), await make_upstream()
    first.script = Script(status=503, body=b'{"error":{"message":"down"}}')
    proxy = await make_proxy(routed_config(
        [deployment("main", first, "main-1"),
         deployment("backup", second, "backup-1", stream_usage=False)],
        num_retries=0, fallbacks=[{"main": ["backup"]}],
    ))

    status, _, headers = await routed_chat(proxy, "main", stream=True)

    assert status == 200 and headers["x-keystile-fallback"] == "backup"
    assert first.received[0].json["stream_options"] == {"include_usage": True}
    assert "stream_options" not in second.received[0].json


async def test_a_body_that_cannot_be_read_is_refused_after_the_key_is_checked(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    key = await proxy.generate(key_alias="gz")
    broken = {"Content-Encoding": "gzip", "Content-Type": "application/json"}

    status, body, _ = await proxy.request("POST", "/chat/completions", key=key,
                                          data=b"not gzip at all", headers=broken)
    assert status == 400 and "could not be read" in body["error"]["message"]
    status, _, _ = await proxy.request("POST", "/chat/completions", key="sk-not-a-key-0000",
                                       data=b"not gzip at all", headers=broken)
    assert status == 401

    (row,) = await rows(proxy, 1)
    assert (row["key_alias"], row["status"]) == ("gz", 400)
    assert "Traceback" not in caplog.text
