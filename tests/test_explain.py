"""POST /route/explain: a dry run of the chain that matches the real call."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import pytest

from keystile.state import CHAIN, KEYSTORE

from .conftest import MakeProxy, Proxy, base_config
from .fakes import FakeUpstream

MESSAGES = [{"role": "user", "content": "hello"}]
CHAT = {"model": "gpt-3.5-turbo", "messages": MESSAGES}
DOCUMENTED_400 = (
    b'{"error":{"message":"BadRequest please pass param=user in request body. '
    b'This is a required param for service account","type":"bad_request_error",'
    b'"param":"user","code":"400"}}'
)


async def post(proxy: Proxy, path: str, key: str | None, body: Any,
               headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Status and the exact bytes of the answer."""
    headers = dict(headers or {})
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with proxy.session.post(proxy.url + path, data=data, headers=headers) as response:
        return response.status, await response.read()


async def explain(proxy: Proxy, key: str | None, body: Any,
                  headers: dict[str, str] | None = None) -> dict[str, Any]:
    status, raw = await post(proxy, "/route/explain", key, body, headers)
    assert status == 200, raw
    answer: dict[str, Any] = orjson.loads(raw)
    return answer


def policy_names(proxy: Proxy) -> list[str]:
    return [policy.name for policy in proxy.runner.app[CHAIN]]


def assert_refused_by(proxy: Proxy, answer: dict[str, Any], policy: str) -> None:
    """The answer names the policy, and the checks stop there."""
    names = policy_names(proxy)
    assert answer["allowed"] is False
    assert answer["rejected_by"] == policy
    assert [check["policy"] for check in answer["checks"]] == names
    stop = names.index(policy)
    outcomes = [check["outcome"] for check in answer["checks"]]
    assert outcomes == ["passed"] * stop + ["rejected"] + ["not_run"] * (len(names) - stop - 1)
    rejected = answer["checks"][stop]
    assert rejected["reason"] == answer["error"]["body"]["error"]["message"]


# Each case: set up a key and say who explains, then the key for the real
# call, the body, the refusing policy and the status the real call gets.
Setup = Callable[[Proxy], Awaitable[tuple[str | None, str, dict[str, Any]]]]


async def _unknown_key(proxy: Proxy) -> tuple[str | None, str, dict[str, Any]]:
    return None, "sk-never-issued-0000000000000000", CHAT


async def _blocked_key(proxy: Proxy) -> tuple[str | None, str, dict[str, Any]]:
    key = await proxy.generate(key_alias="blocked")
    await proxy.admin("/key/block", {"key": "blocked"})
    return "blocked", key, CHAT


async def _expired_key(proxy: Proxy) -> tuple[str | None, str, dict[str, Any]]:
    created = await proxy.admin("/key/generate", {"key_alias": "old", "duration": "1h"})
    # Moved into the past through the keystore, rather than waiting an hour.
    await proxy.runner.app[KEYSTORE].update(
        created["token"], {"expires_at": time.time() - 60}
    )
    return "old", created["key"], CHAT


async def _service_account_without_user(
    proxy: Proxy,
) -> tuple[str | None, str, dict[str, Any]]:
    key = await proxy.generate(key_alias="svc", account_type="service_account")
    return "svc", key, CHAT


async def _model_not_allowed(proxy: Proxy) -> tuple[str | None, str, dict[str, Any]]:
    key = await proxy.generate(key_alias="mock-only", models=["mock-model"])
    return "mock-only", key, CHAT


async def _unknown_model(proxy: Proxy) -> tuple[str | None, str, dict[str, Any]]:
    key = await proxy.generate(key_alias="any")
    return "any", key, {"model": "gpt-9", "messages": MESSAGES}


async def _missing_model(proxy: Proxy) -> tuple[str | None, str, dict[str, Any]]:
    key = await proxy.generate(key_alias="any")
    return "any", key, {"messages": MESSAGES}


REJECTIONS = [
    pytest.param(_unknown_key, "auth", 401, id="auth-unknown"),
    pytest.param(_blocked_key, "auth", 401, id="auth-blocked"),
    pytest.param(_expired_key, "auth", 401, id="auth-expired"),
    pytest.param(_service_account_without_user, "required_params", 400,
                 id="required-params"),
    pytest.param(_model_not_allowed, "model_access", 403, id="model-access-403"),
    pytest.param(_unknown_model, "model_access", 400, id="unknown-model-400"),
    pytest.param(_missing_model, "model_access", 400, id="missing-model-400"),
]


@pytest.mark.parametrize(("setup", "policy", "status"), REJECTIONS)
async def test_a_key_explaining_its_own_refused_request_gets_the_real_error(
    proxy: Proxy, upstream: FakeUpstream, setup: Setup, policy: str, status: int
) -> None:
    _, key, body = await setup(proxy)

    answer = await explain(proxy, key, body)
    real_status, real_body = await post(proxy, "/v1/chat/completions", key, body)

    assert_refused_by(proxy, answer, policy)
    assert answer["error"]["status"] == real_status == status
    assert orjson.dumps(answer["error"]["body"]) == real_body
    assert upstream.received == []


@pytest.mark.parametrize(("setup", "policy", "status"), REJECTIONS)
async def test_the_master_explaining_a_named_key_gets_the_real_error(
    proxy: Proxy, upstream: FakeUpstream, setup: Setup, policy: str, status: int
) -> None:
    alias, key, body = await setup(proxy)

    named = alias if alias is not None else key
    answer = await explain(proxy, proxy.master_key, {"key": named} | body)
    real_status, real_body = await post(proxy, "/v1/chat/completions", key, body)

    assert_refused_by(proxy, answer, policy)
    assert answer["error"]["status"] == real_status == status
    assert orjson.dumps(answer["error"]["body"]) == real_body
    assert upstream.received == []


async def test_the_service_account_explanation_carries_the_documented_400(
    proxy: Proxy,
) -> None:
    key = await proxy.generate(key_alias="svc", account_type="service_account")

    answer = await explain(proxy, key, CHAT)

    assert answer["error"] == {
        "status": 400, "headers": {}, "body": orjson.loads(DOCUMENTED_400),
    }
    assert answer["key"] == {
        "key_alias": "svc", "key_name": answer["key"]["key_name"],
        "account_type": "service_account",
    }
    assert answer["key"]["key_name"] == "sk-..." + key[-4:]
    assert answer["model_group"] is None and answer["deployment"] is None


async def test_an_allowed_request_shows_where_it_would_go_and_calls_nothing(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    config = base_config(upstream)
    config["model_list"][0]["model_info"] = {"id": "fake-upstream-1"}
    proxy = await make_proxy(config)
    key = await proxy.generate(key_alias="svc", account_type="service_account")
    body = CHAT | {"user": "alice"}

    status, raw = await post(proxy, "/route/explain", key, body)
    answer = orjson.loads(raw)

    assert status == 200
    assert upstream.received == []
    assert answer["allowed"] is True
    assert answer["rejected_by"] is None and answer["error"] is None
    assert answer["endpoint"] == "chat/completions"
    assert answer["model_group"] == "gpt-3.5-turbo"
    assert answer["deployment"] == {
        "id": "fake-upstream-1",
        "provider": "openai",
        "api_base": f"{upstream.url}/v1",
        "model": "gpt-3.5-turbo-0125",
    }
    assert answer["fallbacks"] == [] and answer["cooling_down"] == []
    assert [check["policy"] for check in answer["checks"]] == policy_names(proxy)
    assert all(check["outcome"] == "passed" for check in answer["checks"])
    reasons = {check["policy"]: check["reason"] for check in answer["checks"]}
    assert reasons["routing"] == "deployment fake-upstream-1 of model group 'gpt-3.5-turbo'"
    assert reasons["model_access"] == "'gpt-3.5-turbo' is model group 'gpt-3.5-turbo'"
    assert b"sk-upstream-secret-0000" not in raw

    completion = await proxy.openai(key).chat.completions.create(
        model="gpt-3.5-turbo", messages=MESSAGES, user="alice"
    )

    assert completion.id == "chatcmpl-upstream-0001"
    assert [received.path for received in upstream.received] == ["/v1/chat/completions"]


async def test_explains_consume_nothing(proxy: Proxy, upstream: FakeUpstream) -> None:
    # With an rpm limit of 1, a single counted explanation would leave no
    # room for the real request once rate limits are enforced.
    key = await proxy.generate(key_alias="one-a-minute", rpm_limit=1)

    answers = [await explain(proxy, key, CHAT) for _ in range(20)]
    status, _ = await post(proxy, "/v1/chat/completions", key, CHAT)

    assert all(answer["allowed"] for answer in answers)
    assert status == 200
    assert len(upstream.received) == 1
    info = await proxy.admin("/key/info?key=one-a-minute", method="GET")
    assert info["info"]["spend"] == 0


async def test_a_virtual_key_may_not_explain_another_key(proxy: Proxy) -> None:
    await proxy.generate(key_alias="other")
    key = await proxy.generate(key_alias="mine")

    status, raw = await post(proxy, "/route/explain", key, {"key": "other"} | CHAT)

    assert status == 403
    assert orjson.loads(raw)["error"] == {
        "message": "Only the master key may explain another key",
        "type": "permission_error", "param": "key", "code": "403",
    }


async def test_naming_a_key_needs_a_valid_caller(proxy: Proxy) -> None:
    await proxy.generate(key_alias="other")

    status, raw = await post(proxy, "/route/explain", "sk-not-a-real-key-00000000",
                             {"key": "other"} | CHAT)

    assert status == 401
    assert orjson.loads(raw)["error"]["message"] == "Invalid API key sk-...0000"


async def test_the_master_naming_an_unknown_alias_gets_404(proxy: Proxy) -> None:
    status, raw = await post(proxy, "/route/explain", proxy.master_key,
                             {"key": "nobody"} | CHAT)

    assert status == 404
    assert orjson.loads(raw)["error"]["param"] == "key"


async def test_the_master_names_a_key_by_its_hash(proxy: Proxy) -> None:
    created = await proxy.admin("/key/generate", {"key_alias": "by-hash"})

    answer = await explain(proxy, proxy.master_key, {"key": created["token"]} | CHAT)

    assert answer["allowed"] is True
    assert answer["key"]["key_alias"] == "by-hash"


async def test_the_master_explains_its_own_request(proxy: Proxy) -> None:
    answer = await explain(proxy, proxy.master_key, CHAT)

    assert answer["allowed"] is True
    assert answer["key"] == {"key_alias": None, "key_name": None, "account_type": "master"}
    reasons = {check["policy"]: check["reason"] for check in answer["checks"]}
    assert reasons["auth"] == "the master key"
    assert reasons["required_params"] == "the master key is exempt"


async def test_a_refused_key_learns_nothing_more_about_itself(proxy: Proxy) -> None:
    key = await proxy.generate(key_alias="secret-project")
    await proxy.admin("/key/block", {"key": "secret-project"})

    as_itself = await explain(proxy, key, CHAT)
    as_master = await explain(proxy, proxy.master_key, {"key": "secret-project"} | CHAT)

    assert as_itself["key"] is None
    assert as_master["key"]["key_alias"] == "secret-project"
    assert as_itself["error"] == as_master["error"]


async def test_a_param_header_counts_as_in_the_real_request(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    config = base_config(upstream)
    config["general_settings"]["service_account_settings"]["param_headers"] = {
        "user": "x-end-user-id"
    }
    proxy = await make_proxy(config)
    key = await proxy.generate(account_type="service_account")

    answer = await explain(proxy, key, CHAT, headers={"X-End-User-Id": "alice"})
    status, _ = await post(proxy, "/v1/chat/completions", key, CHAT,
                           headers={"X-End-User-Id": "alice"})

    assert answer["allowed"] is True
    assert status == 200
    assert upstream.received[0].json["user"] == "alice"


@pytest.mark.parametrize(("endpoint", "path"), [
    ("chat", "chat/completions"),
    ("completions", "completions"),
    ("embeddings", "embeddings"),
])
async def test_the_endpoint_field_picks_the_explained_route(
    proxy: Proxy, endpoint: str, path: str
) -> None:
    key = await proxy.generate()

    answer = await explain(proxy, key, {"endpoint": endpoint, "model": "mock-model"})

    assert answer["allowed"] is True
    assert answer["endpoint"] == path


@pytest.mark.parametrize(("data", "message", "param"), [
    (b"{not json", "The request body is not valid JSON", None),
    (b"[1, 2]", "The request body must be a JSON object", None),
    (b"", "The request body is empty: send a JSON object", None),
    (orjson.dumps({"endpoint": "images", "model": "mock-model"}),
     "Unknown endpoint 'images': use chat, completions or embeddings", "endpoint"),
    (orjson.dumps({"endpoint": 3, "model": "mock-model"}),
     "Unknown endpoint 3: use chat, completions or embeddings", "endpoint"),
])
async def test_a_malformed_explain_request_is_a_400(
    proxy: Proxy, data: bytes, message: str, param: str | None
) -> None:
    key = await proxy.generate()

    status, raw = await post(proxy, "/route/explain", key, data)

    assert status == 400
    error = orjson.loads(raw)["error"]
    assert error["message"].startswith(message)
    assert error["param"] == param and error["code"] == "400"
