"""The error envelope, pinned for each kind of failure."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any

import pytest

from .conftest import MakeProxy, Proxy, base_config
from .fakes import FakeUpstream, Script

CHAT = "/v1/chat/completions"


def assert_envelope(body: Any, status: int, type: str, param: str | None = None) -> str:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == str(status)
    assert error["type"] == type
    assert error["param"] == param
    assert error["message"]
    return str(error["message"])


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b"", "empty"),
        (b'{"messages": []}', "must name a model"),
        (b'{"model": 42}', "must name a model"),
    ],
)
async def test_malformed_bodies_are_400(proxy: Proxy, data: bytes, fragment: str) -> None:
    key = await proxy.generate()

    status, body, _ = await proxy.request("POST", CHAT, key=key, data=data,
                                          headers={"Content-Type": "application/json"})

    assert status == 400
    param = "model" if "model" in fragment else None
    assert fragment in assert_envelope(body, 400, "invalid_request_error", param)


async def test_unknown_model_names_only_the_models_the_key_may_use(proxy: Proxy) -> None:
    key = await proxy.generate(models=["mock-model"])

    status, body, _ = await proxy.request("POST", CHAT, key=key, json={"model": "nope"})

    assert status == 403  # not in the key's list, whether it exists or not
    message = assert_envelope(body, 403, "permission_error", "model")
    assert "mock-model" in message and "gpt-3.5-turbo" not in message

    open_key = await proxy.generate()
    status, body, _ = await proxy.request("POST", CHAT, key=open_key, json={"model": "nope"})
    assert status == 400
    message = assert_envelope(body, 400, "invalid_request_error", "model")
    assert "'nope'" in message and "gpt-3.5-turbo" in message


async def test_key_limited_to_other_models_is_403(proxy: Proxy, upstream: FakeUpstream) -> None:
    key = await proxy.generate(models=["mock-model"])

    status, body, _ = await proxy.request("POST", CHAT, key=key,
                                          json={"model": "gpt-3.5-turbo", "messages": []})

    assert status == 403
    assert_envelope(body, 403, "permission_error", "model")
    assert upstream.received == []


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ({}, "No API key"),
        ({"Authorization": "Bearer sk-not-a-real-key-000000000000"}, "Invalid API key sk-...0000"),
        ({"Authorization": "Basic abc"}, "expected 'Bearer <key>'"),
        ({"Authorization": "Bearer"}, "expected 'Bearer <key>'"),
    ],
)
async def test_authentication_failures_are_401(
    proxy: Proxy, headers: dict[str, str], fragment: str
) -> None:
    status, body, _ = await proxy.request("POST", CHAT, json={"model": "mock-model"},
                                          headers=headers)

    assert status == 401
    assert fragment in assert_envelope(body, 401, "authentication_error", "key")


async def test_unknown_route_and_method_are_enveloped(proxy: Proxy) -> None:
    status, body, _ = await proxy.request("GET", "/v1/nothing-here")
    assert status == 404
    assert_envelope(body, 404, "not_found_error")

    status, body, _ = await proxy.request("POST", "/chat%2Fcompletions", json={})
    assert status == 404
    assert_envelope(body, 404, "not_found_error")

    status, body, headers = await proxy.request("GET", CHAT)
    assert status == 405
    assert_envelope(body, 405, "invalid_request_error")
    assert headers["Allow"] == "POST"
    assert "x-request-id" in headers


async def test_upstream_openai_error_passes_unchanged(proxy: Proxy, upstream: FakeUpstream) -> None:
    original = (b'{"error":{"message":"This model\'s maximum context length is 16385 tokens",'
                b'"type":"invalid_request_error","param":"messages",'
                b'"code":"context_length_exceeded"}}')
    upstream.script = Script(status=400, body=original)
    key = await proxy.generate()

    async with proxy.session.post(proxy.url + CHAT, json={"model": "gpt-3.5-turbo"},
                                  headers={"Authorization": f"Bearer {key}"}) as response:
        raw = await response.read()

    assert response.status == 400
    assert raw == original


async def test_upstream_non_json_error_is_wrapped(proxy: Proxy, upstream: FakeUpstream) -> None:
    upstream.script = Script(status=503, body=b"<html>overloaded</html>",
                             content_type="text/html", headers={"Retry-After": "7"})
    key = await proxy.generate()

    status, body, headers = await proxy.request("POST", CHAT, key=key,
                                                json={"model": "gpt-3.5-turbo"})

    assert status == 503
    assert "overloaded" in assert_envelope(body, 503, "upstream_error")
    assert headers["Retry-After"] == "7"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_unreachable_upstream_is_502(make_proxy: MakeProxy) -> None:
    config = base_config(None)
    config["model_list"].append({"model_name": "down", "litellm_params": {
        "model": "openai/down", "api_base": f"http://127.0.0.1:{_closed_port()}/v1"}})
    proxy = await make_proxy(config)
    key = await proxy.generate()

    status, body, _ = await proxy.request("POST", CHAT, key=key, json={"model": "down"})

    assert status == 502
    assert "could not be reached" in assert_envelope(body, 502, "upstream_error")


async def test_slow_upstream_is_504(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    config = base_config(upstream)
    config["model_list"][0]["litellm_params"]["timeout"] = 0.2
    proxy = await make_proxy(config)
    upstream.script = Script(stall=asyncio.Event())
    key = await proxy.generate()

    status, body, _ = await proxy.request("POST", CHAT, key=key,
                                          json={"model": "gpt-3.5-turbo"})

    assert status == 504
    assert "0.2 s" in assert_envelope(body, 504, "timeout_error")
    upstream.script.stall.set()


async def test_large_bodies_are_normal_traffic(proxy: Proxy, upstream: FakeUpstream) -> None:
    key = await proxy.generate()
    image = "data:image/png;base64," + "A" * (6 * 1024 * 1024)
    messages = [{"role": "user", "content": [{"type": "image_url",
                                              "image_url": {"url": image}}]}]

    status, body, _ = await proxy.request(
        "POST", CHAT, key=key, json={"model": "gpt-3.5-turbo", "messages": messages}
    )

    assert status == 200, body
    assert upstream.received[0].json["messages"] == messages


async def test_a_newline_in_the_path_gets_the_envelope_and_cannot_forge_a_log_line(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    forged = "2026-01-01 00:00:00,000 INFO keystile.access: 127.0.0.1 POST /key/delete 200"

    status, body, _ = await proxy.request(
        "GET", "/v1/models%0A" + forged.replace(" ", "%20"))

    assert status == 404
    assert_envelope(body, 404, "not_found_error")
    lines = caplog.text.splitlines()
    assert not any(line.startswith(forged[:30]) for line in lines)
