"""Azure OpenAI's URL and header shape; request ids and routing headers."""

from __future__ import annotations

import logging
import re

import pytest

from .conftest import MASTER_KEY, MakeProxy
from .fakes import Script
from .routes import MESSAGES, chat, config, deployment


def _azure(fake, **extra) -> dict:
    return {
        "model_name": "gpt-4o",
        "litellm_params": {
            "model": "azure/gpt-4o-prod",
            "api_base": f"{fake.url}/",
            "api_version": "2024-06-01",
            "api_key": "azure-secret-key",
        } | extra,
        "model_info": {"id": "azure-east"},
    }


@pytest.mark.parametrize("path, body", [
    ("/chat/completions", {"model": "gpt-4o", "messages": MESSAGES}),
    ("/completions", {"model": "gpt-4o", "prompt": "hello"}),
    ("/embeddings", {"model": "gpt-4o", "input": "hello"}),
])
async def test_azure_url_and_header(make_proxy: MakeProxy, make_upstream, path: str,
                                    body: dict) -> None:
    fake = await make_upstream()
    proxy = await make_proxy(config([_azure(fake)]))

    status, _, _ = await proxy.request("POST", path, key=MASTER_KEY, json=body)

    assert status == 200
    received = fake.received[0]
    assert received.path == (
        f"/openai/deployments/gpt-4o-prod{path}?api-version=2024-06-01"
    )
    assert received.headers["api-key"] == "azure-secret-key"
    assert "Authorization" not in received.headers


async def test_azure_through_the_openai_client(make_proxy: MakeProxy, make_upstream) -> None:
    fake = await make_upstream()
    proxy = await make_proxy(config([_azure(fake)]))
    client = proxy.openai(MASTER_KEY)

    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                  stream=True)
    words = [c.choices[0].delta.content async for c in stream if c.choices]

    assert words == ["Hello", " there", "!", None]
    assert fake.received[0].path.startswith("/openai/deployments/gpt-4o-prod/")


@pytest.mark.parametrize("sent, echoed", [
    ("req-123_abc.DEF", True),
    ("a" * 128, True),
    ("a" * 129, False),
    ("has space", False),
    ("semi;colon", False),
    ("", False),
    (None, False),
])
async def test_request_id(make_proxy: MakeProxy, make_upstream, sent: str | None,
                          echoed: bool) -> None:
    fake = await make_upstream()
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")]))
    headers = {"x-request-id": sent} if sent is not None else {}

    _, _, answered = await chat(proxy, "gpt-4o", headers=headers)
    _, _, unauthenticated = await chat(proxy, "gpt-4o", key="sk-wrong", headers=headers)

    for got in (answered["x-request-id"], unauthenticated["x-request-id"]):
        if echoed:
            assert got == sent
        else:
            assert re.fullmatch(r"[0-9a-f]{32}", got)


async def test_headers_and_access_log_name_the_route(
    make_proxy: MakeProxy, make_upstream, caplog: pytest.LogCaptureFixture
) -> None:
    bad, good = await make_upstream(), await make_upstream()
    bad.script = Script(status=500)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", bad, "primary-east"),
         deployment("gpt-4o-mini", good, "mini-west")],
        num_retries=1, fallbacks=[{"gpt-4o": ["gpt-4o-mini"]}],
    ))

    with caplog.at_level(logging.INFO, logger="keystile.access"):
        _, _, headers = await chat(proxy, "gpt-4o", headers={"x-request-id": "trace-1"})
        _, _, plain = await chat(proxy, "gpt-4o-mini")

    assert headers["x-request-id"] == "trace-1"
    assert headers["x-keystile-model-group"] == "gpt-4o"
    assert headers["x-keystile-deployment-id"] == "mini-west"
    assert headers["x-keystile-retries"] == "2"
    assert headers["x-keystile-fallback"] == "gpt-4o-mini"
    assert plain["x-keystile-retries"] == "0" and "x-keystile-fallback" not in plain
    line = next(r.getMessage() for r in caplog.records if "request_id=trace-1" in r.getMessage())
    assert "model=gpt-4o " in line
    assert "deployment=mini-west" in line
    assert "retries=2" in line
    assert "fallback=gpt-4o-mini" in line


async def test_an_upstream_redirect_is_not_followed(make_proxy: MakeProxy, make_upstream) -> None:
    # Following it would send the prompt, and Azure's api-key, elsewhere.
    fake, elsewhere = await make_upstream(), await make_upstream()
    fake.script = Script(status=307, body=b"", headers={
        "Location": f"{elsewhere.url}/openai/deployments/gpt-4o-prod/chat/completions",
    })
    proxy = await make_proxy(config([_azure(fake)]))

    status, body, _ = await proxy.request("POST", "/chat/completions", key=MASTER_KEY,
                                          json={"model": "gpt-4o", "messages": MESSAGES})

    assert status == 502
    assert body["error"]["type"] == "upstream_error" and "redirect" in body["error"]["message"]
    assert len(fake.received) >= 1
    assert elsewhere.received == []
