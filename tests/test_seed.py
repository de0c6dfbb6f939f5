"""The documented service-account scenario, through the official client."""

from __future__ import annotations

import openai
import orjson
import pytest

from .conftest import Proxy
from .fakes import FakeUpstream

DOCUMENTED_400 = (
    b'{"error":{"message":"BadRequest please pass param=user in request body. '
    b'This is a required param for service account","type":"bad_request_error",'
    b'"param":"user","code":"400"}}'
)
MESSAGES = [{"role": "user", "content": "hello"}]


async def test_service_account_without_user_gets_the_documented_400(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate(key_alias="svc", account_type="service_account")
    client = proxy.openai(key)

    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)

    error = caught.value
    assert error.status_code == 400
    assert error.response.content == DOCUMENTED_400
    assert error.body == {
        "message": "BadRequest please pass param=user in request body. "
                   "This is a required param for service account",
        "type": "bad_request_error",
        "param": "user",
        "code": "400",
    }
    assert upstream.received == []


async def test_service_account_with_user_gets_a_completion(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate(account_type="service_account")
    client = proxy.openai(key)

    completion = await client.chat.completions.create(
        model="gpt-3.5-turbo", messages=MESSAGES, user="test-user"
    )

    assert completion.object == "chat.completion"
    assert completion.id == "chatcmpl-upstream-0001"
    assert completion.model == "gpt-3.5-turbo-0125"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == 21
    forwarded = upstream.received[0]
    assert forwarded.path == "/v1/chat/completions"
    assert forwarded.json == {"model": "gpt-3.5-turbo-0125", "messages": MESSAGES,
                              "user": "test-user"}
    assert forwarded.headers["Authorization"] == "Bearer sk-upstream-secret-0000"


async def test_streamed_call_yields_the_chunks_in_order(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate(account_type="service_account")
    client = proxy.openai(key)

    stream = await client.chat.completions.create(
        model="gpt-3.5-turbo", messages=MESSAGES, user="test-user", stream=True
    )
    pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]

    assert pieces == ["Hello", " there", "!", None]


async def test_documented_400_also_comes_back_for_stream_requests(proxy: Proxy) -> None:
    key = await proxy.generate(account_type="service_account")

    status, body, headers = await proxy.request(
        "POST", "/chat/completions", key=key,
        json={"model": "gpt-3.5-turbo", "messages": MESSAGES, "stream": True},
    )

    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert orjson.dumps(body) == DOCUMENTED_400


async def test_mock_model_answers_like_the_reference(make_proxy) -> None:
    from .conftest import base_config

    proxy = await make_proxy(base_config(None))
    key = await proxy.generate(account_type="service_account")
    client = proxy.openai(key)

    completion = await client.chat.completions.create(
        model="mock-model", messages=MESSAGES, user="test-user"
    )
    stream = await client.chat.completions.create(
        model="mock-model", messages=MESSAGES, user="test-user", stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    reference_shape = {"id", "choices", "created", "model", "object",
                       "system_fingerprint", "usage", "service_tier"}
    assert reference_shape <= set(completion.model_dump())
    assert completion.choices[0].message.content == text
    assert completion.model == "mock-model-0001"
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
