"""The SQLite file itself: what is (and is not) in it, and migrations."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from keystore import (
    KeyRecord,
    SqliteKeystore,
    UsageRow,
    display_name,
    hash_key,
    new_key,
)
from keystore.sqlite import SCHEMA_VERSION

from ..conftest import Proxy

DATA = Path(__file__).resolve().parent.parent / "data"


def file_bytes(db_path: Path) -> bytes:
    # The WAL holds recent commits until a checkpoint; read it too.
    return b"".join(
        path.read_bytes() for path in (db_path, Path(f"{db_path}-wal")) if path.exists()
    )


async def test_no_raw_key_is_stored_and_account_type_is_a_column(proxy: Proxy) -> None:
    user = await proxy.admin("/key/generate", {"key_alias": "u"})
    service = await proxy.admin("/key/generate", {"key_alias": "s",
                                                  "account_type": "service_account"})

    stored = file_bytes(proxy.db_path)
    for created in (user, service):
        assert created["key"].encode() not in stored
        assert created["key"][3:].encode() not in stored
    with sqlite3.connect(proxy.db_path) as db:
        rows = dict(db.execute("SELECT key_alias, account_type FROM keys"))
        tokens = {row[0] for row in db.execute("SELECT token FROM keys")}
    assert rows == {"u": "user", "s": "service_account"}
    assert tokens == {hash_key(user["key"]), hash_key(service["key"])}


async def test_account_type_is_checked_by_the_database(tmp_path: Path) -> None:
    store = await SqliteKeystore.open(tmp_path / "k.db")
    await store.close()

    with sqlite3.connect(tmp_path / "k.db") as db, pytest.raises(sqlite3.IntegrityError):
        db.execute("INSERT INTO keys (token, key_name, account_type, created_at, updated_at)"
                   " VALUES ('t', 'sk-...t', 'admin', '', '')")


async def test_version_1_database_is_migrated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    raw = new_key()
    with sqlite3.connect(path) as db:
        db.executescript((DATA / "schema_v1.sql").read_text())
        db.execute(
            "INSERT INTO keys (token, key_name, key_alias, account_type, models, metadata,"
            " created_at, blocked, expires_at) VALUES (?, ?, 'legacy', 'service_account',"
            " '[\"gpt-4o\"]', '{}', '2026-01-01T00:00:00.000Z', 0, NULL)",
            (hash_key(raw), display_name(raw)),
        )

    store = await SqliteKeystore.open(path)
    try:
        record = await store.find(hash_key(raw))
        assert record is not None
        assert record.key_alias == "legacy" and record.account_type == "service_account"
        assert record.models == ("gpt-4o",) and record.spend == 0.0
        assert record.updated_at == record.created_at
        updated = await store.update(record.token, {"rpm_limit": 5})
        assert updated is not None and updated.rpm_limit == 5
    finally:
        await store.close()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


async def test_failed_migration_leaves_the_file_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        db.executescript((DATA / "schema_v1.sql").read_text())
        # A column the migration is about to add makes it fail halfway.
        db.execute("ALTER TABLE keys ADD COLUMN spend REAL")

    with pytest.raises(sqlite3.OperationalError):
        await SqliteKeystore.open(path)

    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
        columns = [row[1] for row in db.execute("PRAGMA table_info(keys)")]
    assert "user_id" not in columns


async def test_changes_by_another_process_are_picked_up(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    store = await SqliteKeystore.open(path)
    store.start_watching(0.05)
    try:
        now = time.time()
        raw = new_key()
        record = KeyRecord(token=hash_key(raw), key_name=display_name(raw),
                           created_at=now, updated_at=now, key_alias="x")
        await store.insert(record)
        assert store.cached(record.token) is not None

        with sqlite3.connect(path) as other:
            other.execute("UPDATE keys SET blocked = 1 WHERE key_alias = 'x'")

        deadline = time.monotonic() + 3
        while time.monotonic() < deadline and not store.cached(record.token).blocked:
            await asyncio.sleep(0.02)
        assert store.cached(record.token).blocked
    finally:
        await store.close()


async def test_a_batch_larger_than_one_statement_is_written_whole(tmp_path: Path) -> None:
    # Rows pile up when the file is busy for a while; once written, every
    # row and every key's spend must be there, however many statements the
    # batch takes (rows and keys both beyond what one statement holds).
    path = tmp_path / "k.db"
    store = await SqliteKeystore.open(path)
    try:
        now = time.time()
        keys = []
        for number in range(450):
            raw = new_key()
            record = KeyRecord(token=hash_key(raw), key_name=display_name(raw),
                               created_at=now, updated_at=now, key_alias=f"k{number}")
            stored = await store.insert(record)
            assert stored is not None
            keys.append(stored)
        for number in range(5000):
            key = keys[number % len(keys)]
            store.record_usage(UsageRow(
                time=now, key_hash=key.token, key_alias=key.key_alias,
                account_type="user", end_user=f"u{number}", endpoint="chat/completions",
                model_group="m", deployment_id="m-0", status=200, prompt_tokens=1,
                completion_tokens=2, cost=0.25,
            ), key)
        await store.flush()

        with sqlite3.connect(path) as db:
            users = {row[0] for row in db.execute("SELECT end_user FROM usage")}
            spends = dict(db.execute("SELECT key_alias, spend FROM keys"))
        assert users == {f"u{number}" for number in range(5000)}
        expected = {f"k{n}": 0.25 * len(range(n, 5000, 450)) for n in range(450)}
        assert spends == pytest.approx(expected)
        # Memory took the committed values, and counts nothing twice.
        assert (await store.spend(keys[0]))[0] == pytest.approx(expected["k0"])
    finally:
        await store.close()
