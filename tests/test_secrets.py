"""A raw key is shown once, at creation, and nowhere else."""

from __future__ import annotations

import logging

import pytest

from .conftest import Proxy


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
