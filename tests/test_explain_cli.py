"""``python proxy.py explain``: the same answer, from the files, without a server."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml

from .conftest import MASTER_KEY, Proxy, base_config
from .fakes import FakeUpstream

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_USER = (
    "BadRequest please pass param=user in request body. "
    "This is a required param for service account"
)
DOCUMENTED_400 = (
    '{"error":{"message":"BadRequest please pass param=user in request body. '
    'This is a required param for service account","type":"bad_request_error",'
    '"param":"user","code":"400"}}'
)


async def proxy_py(*args: str) -> tuple[int, str, str]:
    """Run proxy.py as a subprocess; the event loop keeps serving meanwhile."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "proxy.py"), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def columns(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


@pytest.fixture
async def files(tmp_path: Path, upstream: FakeUpstream) -> list[str]:
    """Flags for a config, a database and its one service-account key, "svc"."""
    config = base_config(upstream)
    config["model_list"][0]["model_info"] = {"id": "fake-upstream-1"}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    paths = ["--config", str(config_path), "--db", str(tmp_path / "keys.db")]
    status, _, stderr = await proxy_py(
        "keys", "create", *paths, "--alias", "svc", "--service-account", "--json"
    )
    assert status == 0, stderr
    return paths + ["--key", "svc"]


async def test_the_table_shows_the_refusal_and_every_check(
    files: list[str], upstream: FakeUpstream
) -> None:
    status, stdout, stderr = await proxy_py("explain", *files, "--model", "gpt-3.5-turbo")

    assert status == 3, stderr
    head, checks = stdout.split("\n\n")
    rows = {columns(line)[0]: columns(line)[1:] for line in head.splitlines()}
    assert rows["key"][0] == "svc" and rows["key"][2] == "service_account"
    assert re.fullmatch(r"sk-\.\.\..{4}", rows["key"][1])
    assert rows["allowed"] == ["no, refused by required_params"]
    assert rows["error"] == [f"400 {DOCUMENTED_400}"]
    assert rows["deployment"] == ["-"] and rows["fallbacks"] == ["-"]
    table = [columns(line) for line in checks.splitlines()]
    assert table[:3] == [
        ["policy", "outcome", "reason"],
        ["auth", "passed", f"virtual key {rows['key'][1]}"],
        ["required_params", "rejected", REQUIRED_USER],
    ]
    # Whatever policies follow in the chain are listed, and none of them ran.
    assert "routing" in [row[0] for row in table[3:]]
    assert all(row[1:] == ["not run", "not run: required_params refused the request"]
               for row in table[3:])
    assert upstream.received == []


async def test_json_shows_where_an_allowed_request_would_go(
    files: list[str], upstream: FakeUpstream
) -> None:
    status, stdout, stderr = await proxy_py(
        "explain", *files, "--model", "gpt-3.5-turbo", "--user", "alice", "--json"
    )

    assert status == 0, stderr
    answer = orjson.loads(stdout)
    assert answer["allowed"] is True
    assert answer["key"]["key_alias"] == "svc"
    assert answer["model_group"] == "gpt-3.5-turbo"
    assert answer["deployment"] == {
        "id": "fake-upstream-1",
        "provider": "openai",
        "api_base": f"{upstream.url}/v1",
        "model": "gpt-3.5-turbo-0125",
    }
    assert "sk-upstream-secret-0000" not in stdout
    assert upstream.received == []


async def test_an_unknown_alias_is_exit_1(files: list[str]) -> None:
    status, stdout, stderr = await proxy_py(
        "explain", *files[:-2], "--key", "nobody", "--model", "gpt-3.5-turbo"
    )

    assert status == 1
    assert stdout == ""
    assert stderr.strip() == "error: No key matches 'nobody'"


async def test_an_unknown_endpoint_is_exit_2(files: list[str]) -> None:
    status, _, stderr = await proxy_py("explain", *files, "--endpoint", "images")

    assert status == 2
    assert "Unknown endpoint 'images'" in stderr


async def test_the_command_and_the_route_give_the_same_answer(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    await proxy.generate(key_alias="svc", account_type="service_account")
    paths = ["--config", str(proxy.config_path), "--db", str(proxy.db_path)]
    request: dict[str, Any] = {"model": "gpt-3.5-turbo", "metadata": {"team": "a"}}

    async with proxy.session.post(
        f"{proxy.url}/route/explain", json={"key": "svc"} | request,
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
    ) as response:
        from_route = await response.json()
    status, stdout, stderr = await proxy_py(
        "explain", *paths, "--key", "svc", "--body", orjson.dumps(request).decode(),
        "--json",
    )

    assert status == 3, stderr
    assert orjson.loads(stdout) == from_route
    assert from_route["rejected_by"] == "required_params"
    assert upstream.received == []
