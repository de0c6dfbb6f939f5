"""`python proxy.py keys ...` on the database file, with a live proxy beside it."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from .conftest import MakeProxy, Proxy, base_config
from .test_limits import wait_for

ROOT = Path(__file__).resolve().parent.parent
HELLO = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}


def keys(proxy: Proxy, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KEYSTILE_MASTER_KEY=proxy.master_key)
    return subprocess.run(
        [sys.executable, str(ROOT / "proxy.py"), "keys", args[0], "--config",
         str(proxy.config_path), "--db", str(proxy.db_path), *args[1:]],
        capture_output=True, text=True, timeout=30, env=env, cwd=ROOT,
    )


def keys_json(proxy: Proxy, *args: str) -> Any:
    result = keys(proxy, *args, "--json")
    assert result.returncode == 0, result.stderr
    return orjson.loads(result.stdout)


@pytest.fixture
async def live(make_proxy: MakeProxy) -> Proxy:
    return await make_proxy(base_config(None))


async def test_create_prints_the_key_once_and_it_works_at_once(live: Proxy) -> None:
    result = await asyncio.to_thread(
        keys, live, "create", "--service-account", "--alias", "batch",
        "--models", "mock-model", "--duration", "30d", "--enforce", "user,metadata.run",
    )

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    raw = lines[0].removeprefix("key: ")
    assert raw.startswith("sk-") and result.stdout.count(raw) == 1
    assert "shown once" in lines[1]
    assert re.search(r"^account_type +service_account$", result.stdout, re.MULTILINE)

    # A key created on disk a moment ago is found by its digest (a miss
    # costs one query), so it works on the very next request.
    status, body, _ = await live.request(
        "POST", "/chat/completions", key=raw, json=HELLO | {"user": "u", "metadata": {"run": "1"}}
    )
    assert status == 200, body


async def test_block_on_the_command_line_is_refused_within_two_seconds(live: Proxy) -> None:
    key = await live.generate(key_alias="cli-target")
    status, _, _ = await live.request("POST", "/chat/completions", key=key, json=HELLO)
    assert status == 200

    result = await asyncio.to_thread(keys, live, "block", "cli-target")
    assert result.returncode == 0, result.stderr
    blocked_at = time.monotonic()

    while True:
        status, body, _ = await live.request("POST", "/chat/completions", key=key, json=HELLO)
        if status == 401:
            break
        assert time.monotonic() - blocked_at < 2.0, "the block did not hold within 2 s"
        await asyncio.sleep(0.05)
    assert "is blocked" in body["error"]["message"]


async def test_every_command_with_json_output(live: Proxy) -> None:
    created = await asyncio.to_thread(keys_json, live, "create", "--alias", "j",
                                      "--rpm-limit", "5", "--metadata", '{"team": "x"}')
    assert created["key_alias"] == "j" and created["rpm_limit"] == 5
    assert created["metadata"] == {"team": "x"}

    listed = await asyncio.to_thread(keys_json, live, "list", "--account-type", "user")
    assert [k["key_alias"] for k in listed["keys"]] == ["j"]
    assert "key" not in listed["keys"][0]

    info = await asyncio.to_thread(keys_json, live, "info", created["token"])
    assert info["token"] == created["token"] and "key" not in info

    updated = await asyncio.to_thread(keys_json, live, "update", "j", "--service-account",
                                      "--max-budget", "2.5")
    assert updated["account_type"] == "service_account" and updated["max_budget"] == 2.5

    unblocked = await asyncio.to_thread(keys_json, live, "unblock", created["key"])
    assert unblocked["blocked"] is False

    rotated = await asyncio.to_thread(keys_json, live, "regenerate", "j", "--grace-period", "1h")
    assert rotated["key"] != created["key"] and rotated["grace_until"]

    deleted = await asyncio.to_thread(keys_json, live, "delete", "j")
    assert deleted == {"deleted_keys": [rotated["token"]]}


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (("info", "nobody"), 1, "No key matches 'nobody'"),
        (("delete", "nobody"), 1, "No key matches"),
        (("create", "--duration", "soon"), 2, "duration must be a duration"),
        (("create", "--key", "sk-short"), 2, "key must start with sk-"),
        (("update", "x"), 2, "Nothing to change"),
        (("create", "--rpm-limit", "-3"), 2, "rpm_limit must be a whole number"),
        (("create", "--metadata", "{oops"), 2, "not valid JSON"),
    ],
)
async def test_exit_codes(live: Proxy, args: tuple[str, ...], code: int, fragment: str) -> None:
    await live.generate(key_alias="x")

    result = await asyncio.to_thread(keys, live, *args)

    assert result.returncode == code, (result.stdout, result.stderr)
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr


async def test_tables_are_readable(live: Proxy) -> None:
    await live.generate(key_alias="table-me", models=["mock-model"])

    result = await asyncio.to_thread(keys, live, "list")

    header, row, footer = result.stdout.splitlines()
    assert header.split() == ["key_alias", "key_name", "account_type", "models", "blocked",
                              "expires", "token"]
    assert row.split()[:5] == ["table-me", row.split()[1], "user", "mock-model", "False"]
    assert footer == "1 of 1 key(s)"


async def test_a_mistyped_database_path_is_reported_not_created(live: Proxy, tmp_path: Path) -> None:
    missing = tmp_path / "typo.db"
    env = dict(os.environ, KEYSTILE_MASTER_KEY=live.master_key)

    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(ROOT / "proxy.py"), "keys", "list", "--config",
         str(live.config_path), "--db", str(missing)],
        capture_output=True, text=True, timeout=30, env=env, cwd=ROOT,
    )

    assert result.returncode == 2
    assert f"no database at {missing}" in result.stderr
    assert not missing.exists()


async def test_regenerating_from_the_command_line_keeps_spend_queued_by_the_proxy(
    make_proxy: MakeProxy,
) -> None:
    # The proxy has spend queued under the key's digest when another
    # process gives the key a new one; written afterwards, it must still
    # land on the key.
    config = base_config(None)
    config["general_settings"]["proxy_batch_write_at"] = 60  # only /spend/logs writes
    config["model_list"][0]["model_info"] = {"input_cost_per_token": 0.5}
    live = await make_proxy(config)
    raw = await live.generate(key_alias="busy")
    for _ in range(3):
        status, _, _ = await live.request("POST", "/chat/completions", key=raw, json=HELLO)
        assert status == 200

    # Twice, each seen by the proxy before the next: the first digest is
    # then neither the key's token nor its previous one.
    for _ in range(2):
        before = (await live.admin("/key/info?key=busy", method="GET"))["info"]["key_name"]
        result = await asyncio.to_thread(keys, live, "regenerate", "busy")
        assert result.returncode == 0, result.stderr

        async def noticed(before: str = before) -> bool:
            info = await live.admin("/key/info?key=busy", method="GET")
            return bool(info["info"]["key_name"] != before)

        await wait_for(noticed)
    status, _, _ = await live.request("POST", "/chat/completions", key=raw, json=HELLO)
    assert status == 401  # the first secret is retired
    logs = await live.admin("/spend/logs", method="GET")

    assert logs["total_count"] == 3
    with sqlite3.connect(live.db_path) as db:
        (spend,) = db.execute("SELECT spend FROM keys WHERE key_alias = 'busy'").fetchone()
    assert spend == pytest.approx(sum(log["cost"] for log in logs["logs"])) and spend > 0
