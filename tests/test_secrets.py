"""A raw key is shown once, at creation, and nowhere else."""

from __future__ import annotations

import logging

import pytest

from .conftest import MakeProxy, Proxy, base_config
from .fakes import FakeUpstream, Script


async def test_raw_keys_never_reach_logs_or_later_answers(
    proxy: Proxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    created = await proxy.admin("/key/generate", {"key_alias": "secret-test",
                                                  "account_type": "service_account"})
    raw = created["key"]
    answers = []

    for path in (f"/key/info?key={raw}", "/key/list?return_full_object=true", "/key/list"):
        answers.append(await proxy.admin(path, method="GET"))
    _, own, _ = await proxy.request("GET", "/key/info", key=raw)
    answers.append(own)
    _, refused, _ = await proxy.request("POST", "/chat/completions", key=raw,
                                        json={"model": "gpt-3.5-turbo", "messages": []})
    answers.append(refused)
    answers.append(await proxy.admin("/key/block", {"key": raw}))
    _, blocked, _ = await proxy.request("POST", "/chat/completions", key=raw,
                                        json={"model": "gpt-3.5-turbo", "user": "u"})
    answers.append(blocked)
    answers.append(await proxy.admin("/key/delete", {"keys": [raw]}))

    secret = raw[3:]
    for answer in answers:
        assert secret not in str(answer)
    assert "sk-..." + raw[-4:] in blocked["error"]["message"]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "/key/info" in logged  # the access log did see those calls
    assert secret not in logged
    assert proxy.master_key not in logged


async def test_an_upstream_cookie_is_not_sent_back_with_other_requests(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    # One client pool serves every key: a cookie kept from one answer would
    # travel with the next request, whoever sent it.  (By host name: cookies
    # of a bare IP address are never kept anyway.)
    config = base_config(upstream)
    port = upstream.url.rsplit(":", 1)[1]
    config["model_list"][0]["litellm_params"]["api_base"] = f"http://localhost:{port}/v1"
    proxy = await make_proxy(config)
    upstream.then(Script(headers={"Set-Cookie": "session=from-first-answer; Path=/"}))
    first = await proxy.generate(key_alias="first")
    second = await proxy.generate(key_alias="second")
    body = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}]}

    for key in (first, second):
        status, _, _ = await proxy.request("POST", "/chat/completions", key=key, json=body)
        assert status == 200

    assert len(upstream.received) == 2
    assert "Cookie" not in upstream.received[1].headers
