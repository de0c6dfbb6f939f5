"""Where the key is read from, and what a client learns when it is wrong."""

from __future__ import annotations

import pytest

from ..conftest import Proxy

CHAT = "/chat/completions"
HELLO = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer {key}"},
        {"Authorization": "bearer {key}"},
        {"Authorization": "  BEARER   {key}  "},
        {"api-key": "{key}"},
        {"x-api-key": "{key}"},
    ],
)
async def test_key_is_accepted_from_every_supported_header(
    proxy: Proxy, headers: dict[str, str]
) -> None:
    key = await proxy.generate()
    filled = {name: value.format(key=key) for name, value in headers.items()}

    status, _, _ = await proxy.request("POST", CHAT, json=HELLO, headers=filled)

    assert status == 200


async def test_authorization_header_wins_over_api_key(proxy: Proxy) -> None:
    key = await proxy.generate()

    status, body, _ = await proxy.request(
        "POST", CHAT, json=HELLO,
        headers={"Authorization": "Bearer sk-wrong-wrong-wrong-wrong", "api-key": key},
    )

    assert status == 401 and "sk-...rong" in body["error"]["message"]


async def test_stored_hash_never_authenticates(proxy: Proxy) -> None:
    created = await proxy.admin("/key/generate", {})

    status, body, _ = await proxy.request("POST", CHAT, key=created["token"], json=HELLO)

    assert status == 401 and body["error"]["param"] == "key"


async def test_master_key_may_call_models_directly(proxy: Proxy) -> None:
    status, body, _ = await proxy.request("POST", CHAT, key=proxy.master_key, json=HELLO)

    assert status == 200 and body["object"] == "chat.completion"


async def test_models_lists_only_what_the_key_may_use(proxy: Proxy) -> None:
    limited = await proxy.generate(models=["mock-model"], aliases={"cheap": "mock-model"})
    everything = await proxy.generate()

    _, body, _ = await proxy.request("GET", "/v1/models", key=limited)
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["mock-model", "cheap"]

    _, body, _ = await proxy.request("GET", "/models", key=everything)
    assert [m["id"] for m in body["data"]] == ["gpt-3.5-turbo", "mock-model"]

    status, _, _ = await proxy.request("GET", "/models")
    assert status == 401


async def test_health_needs_no_key(proxy: Proxy) -> None:
    status, body, _ = await proxy.request("GET", "/health/liveliness")
    assert status == 200 and body == "I'm alive!"

    status, body, _ = await proxy.request("GET", "/health/readiness")
    assert status == 200 and body["db"] == "connected"
