"""Input meant to break the proxy: it must answer in the envelope and keep going."""

from __future__ import annotations

import asyncio
import gzip
import logging
import sqlite3
import time
from typing import Any

import orjson
import pytest

from .conftest import MakeProxy, Proxy, base_config, write_lock
from .fakes import FakeUpstream, Script


async def raw_request(proxy: Proxy, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send bytes no well-behaved client library would send."""
    host, port = proxy.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    status = int(answer.split(b" ", 2)[1])
    return status, answer.split(b"\r\n\r\n", 1)[1]


BODY = b'{"model":"mock-model","messages":[{"role":"user","content":"hi"}],"user":"u"}'


@pytest.mark.parametrize(
    "header",
    [b"Authorization: Bearer sk-abc\xff\xfe", b"api-key: sk-abc\xe9\xe9\xe9",
     b"x-api-key: sk-\xc3\xa9t\xc3\xa9-accented-0000"],
)
async def test_undecodable_keys_are_a_401_in_the_envelope(proxy: Proxy, header: bytes) -> None:
    status, body = await raw_request(
        proxy, b"POST /chat/completions HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n"
        b"Content-Type: application/json\r\n", BODY)

    assert status == 401
    error = orjson.loads(body)["error"]
    assert error["param"] == "key" and "printable ASCII" in error["message"]


async def test_undecodable_param_header_is_refused_and_the_ledger_keeps_going(
    make_proxy: MakeProxy,
) -> None:
    config = base_config(None)
    config["general_settings"]["service_account_settings"]["param_headers"] = {
        "user": "x-end-user-id"}
    proxy = await make_proxy(config)
    key = await proxy.generate(key_alias="svc", account_type="service_account")
    body = b'{"model":"mock-model","messages":[]}'

    status, answer = await raw_request(
        proxy, b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + key.encode() + b"\r\nx-end-user-id: al\xffice\r\n", body)
    assert status == 400 and orjson.loads(answer)["error"]["param"] == "user"

    status, _, _ = await proxy.request("POST", "/chat/completions", key=key,
                                       json={"model": "mock-model", "messages": [],
                                             "user": "after"})
    assert status == 200
    deadline = time.monotonic() + 5
    users: list[Any] = []
    while time.monotonic() < deadline and "after" not in users:
        with sqlite3.connect(proxy.db_path) as db:
            users = [row[0] for row in db.execute("SELECT end_user FROM usage")]
        await asyncio.sleep(0.05)
    assert "after" in users


async def test_absurd_upstream_usage_does_not_reach_the_ledger(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    answer = orjson.loads(orjson.dumps({"id": "x", "object": "chat.completion", "choices": []}))
    raw = orjson.dumps(answer)[:-1] + b',"usage":{"prompt_tokens":18446744073709551615,' \
        b'"completion_tokens":1}}'
    upstream.script = Script(body=raw)
    key = await proxy.generate(key_alias="absurd")

    status, _, _ = await proxy.request("POST", "/chat/completions", key=key,
                                       json={"model": "gpt-3.5-turbo", "messages": []})
    assert status == 200

    status, logs, _ = await proxy.request("GET", "/spend/logs?key_alias=absurd",
                                          key=proxy.master_key)
    assert status == 200, logs
    assert logs["logs"][0]["prompt_tokens"] < 1 << 31
    status, _, _ = await proxy.request("GET", "/key/info?key=absurd", key=proxy.master_key)
    assert status == 200


@pytest.mark.parametrize(
    ("path", "json", "param"),
    [
        ("/key/generate", {"duration": "999999999d"}, "duration"),
        ("/key/generate", {"budget_duration": "999999999d"}, "budget_duration"),
        ("/key/generate", {"rpm_limit": 18446744073709551615}, "rpm_limit"),
        ("/key/generate", {"max_budget": 1e300}, "max_budget"),
        ("/key/generate", {"key_alias": "sk-looks-like-a-key"}, "key_alias"),
        ("/key/generate", {"key_alias": "a" * 64}, "key_alias"),
        ("/key/generate", {"key": "sk-has spaces in it 0000"}, "key"),
        ("/key/regenerate", {"key": "victim", "grace_period": "999999999d"}, "grace_period"),
    ],
)
async def test_out_of_range_fields_are_400_naming_them(
    proxy: Proxy, path: str, json: dict[str, Any], param: str
) -> None:
    await proxy.generate(key_alias="victim")

    status, body, _ = await proxy.request("POST", path, key=proxy.master_key, json=json)

    assert status == 400, body
    assert body["error"]["param"] == param


@pytest.mark.parametrize(
    "query",
    ["/spend/logs?end_date=10000-01-01", "/spend/logs?start_date=0001-01-01T00:00:00%2B14:00",
     "/spend/logs?page=%D9%A3", "/spend/logs?page_size=1_0",
     "/spend/logs?page=99999999999999999999999", "/key/list?page=99999999999999999999999"],
)
async def test_out_of_range_queries_are_400(proxy: Proxy, query: str) -> None:
    status, body, _ = await proxy.request("GET", query, key=proxy.master_key)

    assert status == 400, body
    assert body["error"]["code"] == "400"


async def test_key_aliases_name_aliases_only(proxy: Proxy) -> None:
    victim = await proxy.admin("/key/generate", {"key_alias": "victim"})

    status, body, _ = await proxy.request("POST", "/key/delete", key=proxy.master_key,
                                          json={"key_aliases": [victim["token"]]})

    assert status == 404
    status, _, _ = await proxy.request("GET", "/key/info", key=victim["key"])
    assert status == 200


async def test_a_virtual_key_cannot_probe_which_keys_exist(proxy: Proxy) -> None:
    await proxy.generate(key_alias="exists")
    prober = await proxy.generate(key_alias="prober")

    known = await proxy.request("GET", "/key/info?key=exists", key=prober)
    unknown = await proxy.request("GET", "/key/info?key=does-not-exist", key=prober)

    assert known[0] == unknown[0] == 403
    assert known[1] == unknown[1]


async def test_concurrent_regenerates_all_succeed_and_keep_the_key(proxy: Proxy) -> None:
    await proxy.admin("/key/generate", {"key_alias": "spin"})

    answers = await asyncio.gather(*[
        proxy.request("POST", "/key/regenerate", key=proxy.master_key,
                      json={"key": "spin", "grace_period": "1h"})
        for _ in range(4)
    ])

    assert [status for status, _, _ in answers] == [200] * 4
    info = await proxy.admin("/key/info?key=spin", method="GET")
    newest = [body for _, body, _ in answers if body["token"] == info["key"]]
    assert len(newest) == 1
    status, _, _ = await proxy.request("POST", "/chat/completions", key=newest[0]["key"],
                                       json={"model": "mock-model", "messages": []})
    assert status == 200


async def test_compressed_bodies_go_upstream_as_plain_json(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate()
    body = orjson.dumps({"model": "gpt-3.5-turbo", "messages": []})

    status, _, _ = await proxy.request(
        "POST", "/chat/completions", key=key, data=gzip.compress(body),
        headers={"Content-Encoding": "gzip", "Content-Type": "application/x-www-form-urlencoded"})

    assert status == 200
    forwarded = upstream.received[0]
    assert "Content-Encoding" not in forwarded.headers
    assert forwarded.headers["Content-Type"] == "application/json"
    assert forwarded.json["messages"] == []

    status, error, _ = await proxy.request(
        "POST", "/chat/completions", key=key, data=b"\x1f\x8bnot really gzip",
        headers={"Content-Encoding": "gzip"})
    assert status == 400 and error["error"]["code"] == "400"


async def test_odd_message_shapes_still_get_a_ledger_row(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    upstream.script = Script(body=b'{"id":"x","object":"chat.completion","choices":[]}')
    key = await proxy.generate(key_alias="odd")
    messages = [{"role": "user", "content": "x", "tool_calls": 5}]

    status, _, _ = await proxy.request("POST", "/chat/completions", key=key,
                                       json={"model": "gpt-3.5-turbo", "messages": messages})

    assert status == 200
    status, logs, _ = await proxy.request("GET", "/spend/logs?key_alias=odd",
                                          key=proxy.master_key)
    assert status == 200 and len(logs["logs"]) == 1


async def test_a_stream_that_never_ends_an_event_is_cut_off_with_an_error_event(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    block = b"x" * 65536
    upstream.script = Script(chunks=[b"data: " + block] + [block] * 140)
    key = await proxy.generate()

    status, body, _ = await proxy.request(
        "POST", "/chat/completions", key=key,
        json={"model": "gpt-3.5-turbo", "messages": [], "stream": True})

    assert status == 200
    assert len(body) < 1024 * 1024  # nothing of the endless event was relayed
    assert body.startswith(b'data: {"error":{"message":"The upstream for')
    assert b"without ending an event" in body and b"[DONE]" not in body


async def test_cut_streams_are_estimated_whatever_the_json_spacing(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    events = [b'data: {"choices": [{"delta": {"content": "hello there friend"}}]}\n\n'] * 3
    upstream.script = Script(chunks=events, break_after=3)
    key = await proxy.generate(key_alias="spaced")

    status, _, _ = await proxy.request(
        "POST", "/chat/completions", key=key,
        json={"model": "gpt-3.5-turbo", "messages": [], "stream": True})

    assert status == 200
    _, logs, _ = await proxy.request("GET", "/spend/logs?key_alias=spaced",
                                     key=proxy.master_key)
    row = logs["logs"][0]
    assert row["estimated"] in (1, True) and row["completion_tokens"] > 0


@pytest.mark.parametrize(("sent", "passed_on"),
                         [("-5", "0"), ("1.5", "2"), ("inf", None), ("soon", None)])
async def test_upstream_retry_after_reaches_the_client_as_whole_seconds(
    make_proxy: MakeProxy, upstream: FakeUpstream, sent: str, passed_on: str | None
) -> None:
    config = base_config(upstream)
    config["router_settings"] = {"num_retries": 0}
    proxy = await make_proxy(config)
    upstream.script = Script(status=429, body=b'{"error":{"message":"slow down"}}',
                             headers={"Retry-After": sent})
    key = await proxy.generate()

    status, _, headers = await proxy.request("POST", "/chat/completions", key=key,
                                             json={"model": "gpt-3.5-turbo"})

    assert status == 429
    assert headers.get("Retry-After") == passed_on


async def test_a_locked_database_is_a_503_and_readiness_does_not_hang(proxy: Proxy) -> None:
    async with write_lock(proxy.db_path):
        generate = asyncio.create_task(proxy.request(
            "POST", "/key/generate", key=proxy.master_key, json={"key_alias": "locked"}))
        started = time.monotonic()
        ready_status, _, _ = await proxy.request("GET", "/health/readiness")
        ready_seconds = time.monotonic() - started
        status, body, _ = await generate

    assert ready_status == 503 and ready_seconds < 3
    assert status == 503
    assert body["error"]["type"] == "service_unavailable" and "locked" in body["error"]["message"]
    status, _, _ = await proxy.request("POST", "/key/generate", key=proxy.master_key,
                                       json={"key_alias": "locked"})
    assert status == 200  # nothing half-written: the alias is still free


async def test_a_request_that_cannot_be_parsed_is_not_logged_as_an_error(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    # A header line without a colon, carrying a key: aiohttp refuses it
    # before any handler runs.  The log must not fill with tracebacks, nor
    # repeat the request's bytes.
    caplog.set_level(logging.DEBUG)
    secret = "sk-this-key-must-never-be-logged-0000"

    status, _ = await raw_request(
        proxy, b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization Bearer "
        + secret.encode() + b"\r\n", BODY)

    assert status == 400
    server = [r for r in caplog.records if r.name == "aiohttp.server"]
    assert secret not in caplog.text
    assert [r.levelno for r in server] == [logging.DEBUG]
    assert server[0].getMessage() == "malformed request: BadHttpMessage"
    assert server[0].exc_info is None
