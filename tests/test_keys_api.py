"""The /key/* management routes, end to end."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from keystore import hash_key

from .conftest import MakeProxy, Proxy, base_config

CHAT = "/chat/completions"
HELLO = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


async def chat_status(proxy: Proxy, key: str) -> tuple[int, Any]:
    status, body, _ = await proxy.request("POST", CHAT, key=key, json=HELLO)
    return status, body


async def test_generate_answers_every_field_and_the_key_once(proxy: Proxy) -> None:
    body = await proxy.admin("/key/generate", {
        "key_alias": "ci-bot", "user_id": "u1", "team_id": "t1", "models": ["mock-model"],
        "aliases": {"fast": "mock-model"}, "metadata": {"owner": "ops"},
        "duration": "30d", "enforced_params": ["metadata.tenant"], "rpm_limit": 10,
        "tpm_limit": 1000, "max_parallel_requests": 2, "max_budget": 5.5,
        "budget_duration": "30d",
    })

    assert body["key"].startswith("sk-") and len(body["key"]) >= 40
    assert body["token"] == hash_key(body["key"])
    assert body["key_name"] == "sk-..." + body["key"][-4:]
    assert body["account_type"] == "user"
    assert body["models"] == ["mock-model"] and body["aliases"] == {"fast": "mock-model"}
    assert body["enforced_params"] == ["metadata.tenant"]
    assert body["rpm_limit"] == 10 and body["max_budget"] == 5.5
    expires = time.mktime(time.strptime(body["expires"][:19], "%Y-%m-%dT%H:%M:%S"))
    assert abs(expires - time.mktime(time.gmtime()) - 30 * 86400) < 60

    info = await proxy.admin(f"/key/info?key={body['token']}", method="GET")
    assert "sk-" + body["key"][3:] not in str(info)
    assert info["info"]["key_alias"] == "ci-bot"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"colour": "red"}, "colour"),
        ({"key": "sk-short"}, "key"),
        ({"key": "pk-" + "x" * 30}, "key"),
        ({"models": "gpt"}, "models"),
        ({"rpm_limit": -1}, "rpm_limit"),
        ({"rpm_limit": 1.5}, "rpm_limit"),
        ({"max_budget": "lots"}, "max_budget"),
        ({"duration": "30 days"}, "duration"),
        ({"budget_duration": "1y"}, "budget_duration"),
        ({"account_type": "robot"}, "account_type"),
        ({"blocked": "yes"}, "blocked"),
        ({"metadata": [1]}, "metadata"),
        ({"account_type": "user", "metadata": {"service_account_id": "svc"}}, "account_type"),
    ],
)
async def test_generate_rejects_bad_fields_naming_them(
    proxy: Proxy, fields: dict[str, Any], param: str
) -> None:
    status, body, _ = await proxy.request("POST", "/key/generate", key=proxy.master_key,
                                          json=fields)

    assert status == 400, body
    assert body["error"]["param"] == param
    assert param in body["error"]["message"]


async def test_alias_clash_is_400_and_custom_key_works(proxy: Proxy) -> None:
    custom = "sk-my-own-custom-key-123456"
    await proxy.admin("/key/generate", {"key_alias": "one", "key": custom})

    status, body, _ = await proxy.request("POST", "/key/generate", key=proxy.master_key,
                                          json={"key_alias": "one"})

    assert status == 400 and body["error"]["param"] == "key_alias"
    assert (await chat_status(proxy, custom))[0] == 200


async def test_service_account_by_metadata_and_by_route(proxy: Proxy) -> None:
    by_metadata = await proxy.admin("/key/generate",
                                    {"metadata": {"service_account_id": "billing"}})
    by_route = await proxy.admin("/key/service-account/generate", {"key_alias": "sa"})

    assert by_metadata["account_type"] == "service_account"
    assert by_route["account_type"] == "service_account"
    status, body = await chat_status(proxy, by_route["key"])
    assert status == 400 and body["error"]["param"] == "user"


async def test_every_route_takes_key_hash_or_alias(proxy: Proxy) -> None:
    created = await proxy.admin("/key/generate", {"key_alias": "named"})

    for ref in (created["key"], created["token"], "named"):
        info = await proxy.admin(f"/key/info?key={ref}", method="GET")
        assert info["key"] == created["token"]

    status, body, _ = await proxy.request("GET", "/key/info?key=nobody", key=proxy.master_key)
    assert status == 404 and body["error"]["type"] == "not_found_error"


async def test_virtual_key_reads_only_its_own_info(proxy: Proxy) -> None:
    mine = await proxy.admin("/key/generate", {"key_alias": "mine"})
    other = await proxy.admin("/key/generate", {"key_alias": "other"})

    status, body, _ = await proxy.request("GET", "/key/info", key=mine["key"])
    assert status == 200 and body["info"]["key_alias"] == "mine"

    status, body, _ = await proxy.request("GET", f"/key/info?key={other['token']}",
                                          key=mine["key"])
    assert status == 403


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/key/generate"), ("POST", "/key/service-account/generate"),
     ("GET", "/key/list"), ("POST", "/key/update"), ("POST", "/key/delete"),
     ("POST", "/key/block"), ("POST", "/key/unblock"), ("POST", "/key/regenerate")],
)
async def test_virtual_keys_may_not_manage_keys(proxy: Proxy, method: str, path: str) -> None:
    key = await proxy.generate()

    status, body, _ = await proxy.request(method, path, key=key, json={"key": key})

    assert status == 403
    assert body["error"]["type"] == "permission_error"


async def test_without_master_key_admin_is_403_and_virtual_keys_still_work(
    make_proxy: MakeProxy,
) -> None:
    config = base_config(None)
    del config["general_settings"]["master_key"]
    proxy = await make_proxy(config)

    status, body, _ = await proxy.request("POST", "/key/generate", json={},
                                          key="sk-anything-at-all-000000")
    assert status == 403
    assert "No master key is configured" in body["error"]["message"]


async def test_list_filters_and_pages(proxy: Proxy) -> None:
    for i in range(5):
        await proxy.admin("/key/generate", {"key_alias": f"u{i}", "user_id": "alice"})
    for i in range(3):
        await proxy.admin("/key/service-account/generate", {"key_alias": f"s{i}", "team_id": "t"})

    page = await proxy.admin("/key/list?page=2&size=2&user_id=alice", method="GET")
    assert page["total_count"] == 5 and page["total_pages"] == 3
    assert page["current_page"] == 2 and len(page["keys"]) == 2
    assert all(len(token) == 64 for token in page["keys"])

    full = await proxy.admin("/key/list?account_type=service_account&return_full_object=true",
                             method="GET")
    assert [k["key_alias"] for k in full["keys"]] == ["s0", "s1", "s2"]
    assert all("key" not in k for k in full["keys"])

    huge = await proxy.admin("/key/list?size=100000", method="GET")
    assert len(huge["keys"]) == 8 and huge["total_pages"] == 1

    status, _, _ = await proxy.request("GET", "/key/list?page=0", key=proxy.master_key)
    assert status == 400


async def test_update_changes_fields_and_restarts_duration(proxy: Proxy) -> None:
    created = await proxy.admin("/key/generate", {"key_alias": "up", "duration": "1h"})

    updated = await proxy.admin("/key/update", {
        "key": "up", "models": ["gpt-3.5-turbo"], "account_type": "service_account",
        "duration": "30d", "key_alias": "renamed",
    })

    assert updated["models"] == ["gpt-3.5-turbo"]
    assert updated["account_type"] == "service_account"
    assert updated["expires"] > created["expires"]
    status, body, _ = await proxy.request("POST", CHAT, key=created["key"],
                                          json=HELLO | {"user": "u"})
    assert status == 403  # mock-model is no longer allowed: no stale cache

    status, body, _ = await proxy.request("POST", "/key/update", key=proxy.master_key,
                                          json={"key": "renamed", "colour": "red"})
    assert status == 400 and body["error"]["param"] == "colour"


async def test_block_unblock_and_delete_hold_on_the_next_request(proxy: Proxy) -> None:
    created = await proxy.admin("/key/generate", {"key_alias": "b"})
    key = created["key"]

    await proxy.admin("/key/block", {"key": "b"})
    status, body = await chat_status(proxy, key)
    assert status == 401 and "is blocked" in body["error"]["message"]
    assert key not in str(body)

    await proxy.admin("/key/unblock", {"key": key})
    assert (await chat_status(proxy, key))[0] == 200

    answer = await proxy.admin("/key/delete", {"key_aliases": ["b"]})
    assert answer == {"deleted_keys": [created["token"]]}
    status, body = await chat_status(proxy, key)
    assert status == 401 and body["error"]["param"] == "key"


async def test_deleting_an_unknown_key_is_404_and_deletes_nothing(proxy: Proxy) -> None:
    keep = await proxy.generate(key_alias="keep")

    status, body, _ = await proxy.request(
        "POST", "/key/delete", key=proxy.master_key,
        json={"keys": [keep], "key_aliases": ["missing"]},
    )

    assert status == 404 and "missing" in body["error"]["message"]
    assert (await chat_status(proxy, keep))[0] == 200


async def test_expired_key_is_refused_with_its_expiry(proxy: Proxy) -> None:
    created = await proxy.admin("/key/generate", {"duration": "1s"})
    assert (await chat_status(proxy, created["key"]))[0] == 200

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        status, body = await chat_status(proxy, created["key"])
        if status != 200:
            break
        await asyncio.sleep(0.05)

    assert status == 401
    assert body["error"]["type"] == "expired_key"
    assert created["expires"] in body["error"]["message"]


async def test_regenerate_without_grace_retires_the_old_key(proxy: Proxy) -> None:
    created = await proxy.admin("/key/generate", {"key_alias": "rot", "models": ["mock-model"]})

    rotated = await proxy.admin("/key/regenerate", {"key": "rot"})

    assert rotated["key"] != created["key"] and rotated["key_alias"] == "rot"
    assert rotated["models"] == ["mock-model"]
    assert (await chat_status(proxy, created["key"]))[0] == 401
    assert (await chat_status(proxy, rotated["key"]))[0] == 200
    # Nor does the retired secret, or its digest, name the key any more.
    for ref in (created["key"], created["token"]):
        status, body, _ = await proxy.request("GET", f"/key/info?key={ref}",
                                              key=proxy.master_key)
        assert status == 404, body


async def test_regenerate_with_grace_keeps_the_old_key_for_a_while(proxy: Proxy) -> None:
    created = await proxy.admin("/key/generate", {"key_alias": "g"})

    rotated = await proxy.admin("/key/regenerate", {"key": "g", "grace_period": "1h"})

    assert (await chat_status(proxy, created["key"]))[0] == 200
    assert (await chat_status(proxy, rotated["key"]))[0] == 200
    assert rotated["grace_until"] is not None

    short = await proxy.admin("/key/regenerate", {"key": "g", "grace_period": "1s"})
    assert (await chat_status(proxy, rotated["key"]))[0] == 200
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (await chat_status(proxy, rotated["key"]))[0] == 200:
        await asyncio.sleep(0.05)
    assert (await chat_status(proxy, rotated["key"]))[0] == 401
    assert (await chat_status(proxy, short["key"]))[0] == 200
