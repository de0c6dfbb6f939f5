"""Required body params, from all three sources, for every shape of body."""

from __future__ import annotations

from typing import Any

import pytest

from ..conftest import MakeProxy, Proxy, base_config
from ..fakes import FakeUpstream

CHAT = "/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def message(param: str, service_account: bool) -> str:
    tail = " for service account" if service_account else ""
    return (f"BadRequest please pass param={param} in request body. "
            f"This is a required param{tail}")


@pytest.fixture
async def strict(make_proxy: MakeProxy, upstream: FakeUpstream) -> Proxy:
    config = base_config(upstream, enforced_params=["metadata.trace.run_id"])
    config["general_settings"]["service_account_settings"] = {
        "enforced_params": ["user", "metadata.tenant_id"],
        "param_headers": {"user": "x-end-user-id"},
    }
    return await make_proxy(config)


OK_METADATA = {"tenant_id": "acme", "trace": {"run_id": "r1"}}


@pytest.mark.parametrize(
    ("extra", "missing"),
    [
        ({}, "user"),
        ({"user": None, "metadata": OK_METADATA}, "user"),
        ({"user": "", "metadata": OK_METADATA}, "user"),
        ({"user": "   ", "metadata": OK_METADATA}, "user"),
        ({"user": "u"}, "metadata.tenant_id"),
        ({"user": "u", "metadata": None}, "metadata.tenant_id"),
        ({"user": "u", "metadata": "acme"}, "metadata.tenant_id"),
        ({"user": "u", "metadata": ["tenant_id"]}, "metadata.tenant_id"),
        ({"user": "u", "metadata.tenant_id": "flat-dotted-key"}, "metadata.tenant_id"),
        ({"user": "u", "metadata": {"tenant_id": "acme"}}, "metadata.trace.run_id"),
        ({"user": "u", "metadata": {"tenant_id": "acme", "trace": "r1"}}, "metadata.trace.run_id"),
        ({"user": "u", "metadata": {"tenant_id": "acme", "trace": {"run_id": ""}}},
         "metadata.trace.run_id"),
        ({"user": "u", "metadata": OK_METADATA, "stream": True}, None),
        ({"user": ["a", "list"], "metadata": OK_METADATA}, None),
        ({"user": "u", "metadata": OK_METADATA}, None),
    ],
)
async def test_service_account_params(
    strict: Proxy, upstream: FakeUpstream, extra: dict[str, Any], missing: str | None
) -> None:
    key = await strict.generate(account_type="service_account")
    body = {"model": "gpt-3.5-turbo", "messages": MESSAGES} | extra

    status, answer, headers = await strict.request("POST", CHAT, key=key, json=body)

    if missing is None:
        assert status == 200
        expected = body | {"model": "gpt-3.5-turbo-0125"}
        if body.get("stream"):
            # The proxy asks streams for their usage chunk (and hides it).
            expected["stream_options"] = {"include_usage": True}
        assert upstream.received[-1].json == expected
        return
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    by_service_rule = missing in ("user", "metadata.tenant_id")
    assert answer == {"error": {"message": message(missing, by_service_rule),
                                "type": "bad_request_error", "param": missing,
                                "code": "400"}}
    assert upstream.received == []


async def test_user_key_is_held_to_global_and_own_params_only(
    strict: Proxy, upstream: FakeUpstream
) -> None:
    key = await strict.generate(enforced_params=["metadata.project"])
    body: dict[str, Any] = {"model": "gpt-3.5-turbo", "messages": MESSAGES}

    status, answer, _ = await strict.request("POST", CHAT, key=key, json=body)
    assert status == 400 and answer["error"]["message"] == message("metadata.trace.run_id", False)

    body["metadata"] = {"trace": {"run_id": "r"}}
    status, answer, _ = await strict.request("POST", CHAT, key=key, json=body)
    assert status == 400 and answer["error"]["param"] == "metadata.project"

    body["metadata"]["project"] = "p"
    status, _, _ = await strict.request("POST", CHAT, key=key, json=body)
    assert status == 200


async def test_master_key_and_bodiless_routes_are_exempt(strict: Proxy) -> None:
    status, _, _ = await strict.request("POST", CHAT, key=strict.master_key,
                                        json={"model": "gpt-3.5-turbo", "messages": MESSAGES})
    assert status == 200

    key = await strict.generate(account_type="service_account")
    status, _, _ = await strict.request("GET", "/v1/models", key=key)
    assert status == 200


async def test_param_header_satisfies_and_is_written_into_the_body(
    strict: Proxy, upstream: FakeUpstream
) -> None:
    key = await strict.generate(account_type="service_account")
    body = {"model": "gpt-3.5-turbo", "messages": MESSAGES, "metadata": OK_METADATA}

    status, _, _ = await strict.request("POST", CHAT, key=key, json=body,
                                        headers={"X-End-User-Id": "alice"})

    assert status == 200
    assert upstream.received[0].json["user"] == "alice"
    assert upstream.received[0].json["metadata"] == OK_METADATA


async def test_param_headers_are_off_by_default(proxy: Proxy, upstream: FakeUpstream) -> None:
    key = await proxy.generate(account_type="service_account")

    status, answer, _ = await proxy.request(
        "POST", CHAT, key=key, json={"model": "gpt-3.5-turbo", "messages": MESSAGES},
        headers={"X-End-User-Id": "alice"},
    )

    assert status == 400 and answer["error"]["param"] == "user"
    assert upstream.received == []


async def test_accepted_request_reaches_upstream_byte_for_byte(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    config = base_config(upstream)
    config["model_list"][0]["litellm_params"]["model"] = "openai/gpt-3.5-turbo"
    proxy = await make_proxy(config)
    key = await proxy.generate(account_type="service_account")
    raw = b'{"model": "gpt-3.5-turbo",  "user":"u", "messages":[{"role":"user","content":"hi"}]}'

    status, _, _ = await proxy.request("POST", CHAT, key=key, data=raw,
                                       headers={"Content-Type": "application/json"})

    assert status == 200
    assert upstream.received[0].body == raw
