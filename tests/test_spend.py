"""/spend/logs, /spend/report, the SQL views behind them, and the schema
migration that brought them."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from keystore import SqliteKeystore
from keystore.sqlite import SCHEMA_VERSION

from .conftest import MakeProxy, Proxy, write_lock
from .fakes import FakeUpstream
from .test_limits import chat, priced_config

DATA = Path(__file__).parent / "data"


async def traffic(proxy: Proxy) -> tuple[str, str]:
    alpha = await proxy.generate(key_alias="alpha")
    beta = await proxy.generate(key_alias="beta")
    for user in ("ann", "ann", "bo"):
        assert (await chat(proxy, alpha, user=user))[0] == 200
    assert (await chat(proxy, beta, user="bo", model="mock-model"))[0] == 200
    return alpha, beta


async def spend(proxy: Proxy, path: str) -> dict[str, Any]:
    return await proxy.admin(path, method="GET")  # type: ignore[no-any-return]


async def test_spend_logs_filter_and_paginate(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(priced_config(upstream))
    alpha, _ = await traffic(proxy)

    everything = await spend(proxy, "/spend/logs")
    by_alias = await spend(proxy, "/spend/logs?key_alias=beta")
    by_key = await spend(proxy, f"/spend/logs?key={alpha}&end_user=ann")
    by_model = await spend(proxy, "/spend/logs?model=mock-model")
    page = await spend(proxy, "/spend/logs?page=2&page_size=3")
    future = await spend(proxy, "/spend/logs?start_date=2999-01-01")
    today = everything["logs"][0]["time"][:10]
    dated = await spend(proxy, f"/spend/logs?start_date={today}&end_date={today}")

    assert everything["total_count"] == 4
    assert [log["key_alias"] for log in by_alias["logs"]] == ["beta"]
    assert by_key["total_count"] == 2
    assert {log["end_user"] for log in by_key["logs"]} == {"ann"}
    assert by_model["logs"][0]["model_group"] == "mock-model"
    assert (page["total_pages"], len(page["logs"])) == (2, 1)
    assert future["total_count"] == 0
    assert dated["total_count"] == 4
    assert everything["logs"][0]["cost"] == 0  # the mock model has no price
    assert everything["logs"][1]["cost"] == pytest.approx(0.033)


async def test_spend_routes_need_the_master_key(proxy: Proxy) -> None:
    key = await proxy.generate()

    for path in ("/spend/logs", "/spend/report?group_by=user"):
        status, body, _ = await proxy.request("GET", path, key=key)
        assert status == 403
        assert body["error"]["type"] == "permission_error"
    status, body, _ = await proxy.request("GET", "/spend/report?group_by=team",
                                          key=proxy.master_key)
    assert (status, body["error"]["param"]) == (400, "group_by")
    status, body, _ = await proxy.request("GET", "/spend/logs?start_date=yesterday",
                                          key=proxy.master_key)
    assert (status, body["error"]["param"]) == (400, "start_date")


@pytest.mark.parametrize("group_by,view,column", [
    ("key", "spend_by_key", "key_hash"),
    ("user", "spend_by_user", "end_user"),
    ("model", "spend_by_model", "model_group"),
])
async def test_spend_report_gives_the_same_answer_as_its_view(
    make_proxy: MakeProxy, upstream: FakeUpstream, group_by: str, view: str, column: str
) -> None:
    proxy = await make_proxy(priced_config(upstream))
    await traffic(proxy)

    report = (await spend(proxy, f"/spend/report?group_by={group_by}"))["report"]

    connection = sqlite3.connect(proxy.db_path)
    connection.row_factory = sqlite3.Row
    rows = [dict(row) for row in connection.execute(f"SELECT * FROM {view}")]
    connection.close()
    assert sorted(report, key=lambda r: str(r[column])) == sorted(
        rows, key=lambda r: str(r[column]))
    assert sum(row["requests"] for row in report) == 4
    if group_by == "user":
        ann = next(row for row in report if row["end_user"] == "ann")
        assert (ann["requests"], ann["total_tokens"]) == (2, 42)
        assert ann["cost"] == pytest.approx(0.066)


def _make_v2(path: Path) -> None:
    connection = sqlite3.connect(path)
    connection.executescript((DATA / "schema_v2.sql").read_text())
    connection.execute(
        "INSERT INTO keys (token, key_name, key_alias, created_at, updated_at, spend, "
        "max_budget) VALUES (?, 'sk-...abcd', 'old', '2026-01-01T00:00:00.000Z', "
        "'2026-01-01T00:00:00.000Z', 1.5, 10)", ("a" * 64,),
    )
    connection.commit()
    connection.close()


async def test_a_version_2_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    _make_v2(path)

    store = await SqliteKeystore.open(path)
    try:
        record = store.cached("a" * 64)
    finally:
        await store.close()

    assert record is not None and record.spend == 1.5 and record.key_alias == "old"
    connection = sqlite3.connect(path)
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    names = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()
    assert version == SCHEMA_VERSION == 3
    assert {"usage", "spend_by_key", "spend_by_user", "spend_by_model",
            "spend_by_day"} <= names


async def test_a_migrated_database_matches_a_new_one(tmp_path: Path) -> None:
    migrated, fresh = tmp_path / "v2.db", tmp_path / "new.db"
    _make_v2(migrated)
    for path in (migrated, fresh):
        await (await SqliteKeystore.open(path)).close()

    def shape(path: Path) -> dict[str, list[tuple[Any, ...]]]:
        connection = sqlite3.connect(path)
        tables = [row[0] for row in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")]
        out = {t: sorted(connection.execute(f"PRAGMA table_info({t})").fetchall())
               for t in tables}
        connection.close()
        return out

    assert shape(migrated)["usage"] == shape(fresh)["usage"]


async def test_a_failed_migration_leaves_version_2_untouched(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    _make_v2(path)
    connection = sqlite3.connect(path)
    # A view in the way makes the migration fail after its CREATE TABLE.
    connection.execute("CREATE VIEW spend_by_model AS SELECT 1")
    connection.commit()
    connection.close()

    with pytest.raises(sqlite3.Error):
        await SqliteKeystore.open(path)

    connection = sqlite3.connect(path)
    version = connection.execute("PRAGMA user_version").fetchone()[0]
    tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    connection.close()
    assert version == 2
    assert "usage" not in tables


async def one_queued_row(make_proxy: MakeProxy, upstream: FakeUpstream) -> tuple[Proxy, str]:
    """A proxy whose ledger writes only when asked, with one priced request queued."""
    config = priced_config(upstream)
    config["general_settings"]["proxy_batch_write_at"] = 60
    proxy = await make_proxy(config)
    key = await proxy.generate(key_alias="alpha")
    assert (await chat(proxy, key, user="ann"))[0] == 200
    return proxy, key


async def give_up_on_spend_logs(proxy: Proxy, seconds: float) -> None:
    with pytest.raises(TimeoutError):
        async with proxy.session.get(
            proxy.url + "/spend/logs", timeout=aiohttp.ClientTimeout(total=seconds),
            headers={"Authorization": f"Bearer {proxy.master_key}"},
        ) as response:
            await response.read()


async def test_a_client_giving_up_on_spend_logs_mid_write_breaks_nothing(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    # /spend/logs writes the queued usage first.  With the file locked by
    # another process, that write waits; the client gives up meanwhile.
    # Once the lock is gone the write must finish exactly once, and the
    # connection must be usable again: no transaction left open.
    proxy, key = await one_queued_row(make_proxy, upstream)
    async with write_lock(proxy.db_path):
        await give_up_on_spend_logs(proxy, 0.5)

    logs = await spend(proxy, "/spend/logs")
    assert [log["end_user"] for log in logs["logs"]] == ["ann"]
    assert (await chat(proxy, key, user="bo"))[0] == 200
    assert (await spend(proxy, "/spend/logs"))["total_count"] == 2
    assert await proxy.generate(key_alias="beta")
    with sqlite3.connect(proxy.db_path) as db:
        assert db.execute("SELECT COUNT(*) FROM usage").fetchone()[0] == 2
        (charged,) = db.execute("SELECT spend FROM keys WHERE key_alias = 'alpha'").fetchone()
        (cost,) = db.execute("SELECT SUM(cost) FROM usage").fetchone()
    assert charged == pytest.approx(cost) and cost > 0


async def test_spend_logs_answer_503_while_another_process_holds_the_file(
    make_proxy: MakeProxy, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy, _ = await one_queued_row(make_proxy, upstream)
    async with write_lock(proxy.db_path):
        # One client gives up first: its write fails later, with nobody
        # left to hear of it, and must not be reported as a lost error.
        await give_up_on_spend_logs(proxy, 0.2)
        status, body, _ = await proxy.request("GET", "/spend/logs", key=proxy.master_key)

    assert "never retrieved" not in caplog.text
    assert status == 503
    assert body["error"]["type"] == "service_unavailable" and "locked" in body["error"]["message"]
    # The row waited in memory and is written once the file is free.
    assert [log["end_user"] for log in (await spend(proxy, "/spend/logs"))["logs"]] == ["ann"]
