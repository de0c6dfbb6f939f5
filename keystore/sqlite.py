"""The SQLite keystore: one file, one long-lived connection, keys in memory.

Rate-limit counters live in this process's memory (``counters``), and
usage and spend are written behind the requests by ``ledger``.

Authentication must not wait on disk, so every key is held in memory by
digest and SQLite is asked only on a miss.  Writes made through this object
update memory after they commit, before the caller answers.  Writes made by
another process (the command line, the sqlite3 shell) are noticed by a
background task that polls ``PRAGMA data_version`` and reloads the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

import aiosqlite
import orjson

from .base import AliasTaken, KeyConflict, KeyFilter, KeystoreBusy, UsageFilter
from .counters import MemoryCounters
from .ledger import UsageLedger
from .records import KeyRecord, UsageRow, from_iso, to_iso
from .shield import shielded

__all__ = ["SCHEMA_VERSION", "SqliteKeystore"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3
_COLUMNS = (
    "token", "key_name", "key_alias", "account_type", "models", "metadata",
    "created_at", "blocked", "expires_at", "user_id", "team_id", "aliases",
    "enforced_params", "rpm_limit", "tpm_limit", "max_parallel_requests",
    "max_budget", "budget_duration", "budget_reset_at", "spend", "updated_at",
    "grace_token", "grace_until",
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM keys"
_JSON_FIELDS = {"models", "metadata", "aliases", "enforced_params"}
_TIME_FIELDS = {"created_at", "expires_at", "budget_reset_at", "updated_at", "grace_until"}


class SqliteKeystore:
    """Keys in one SQLite file; see the module docstring for the contract."""

    def __init__(self, path: Path, connection: aiosqlite.Connection) -> None:
        self.path = path
        self._db = connection
        self._by_token: dict[str, KeyRecord] = {}
        # One lock for every write and every reload: a reload that read the
        # table just before our own commit must not overwrite its result.
        self._lock = asyncio.Lock()
        self._data_version = 0
        self._watcher: asyncio.Task[None] | None = None
        self.counters = MemoryCounters()
        self.ledger = UsageLedger(
            connection, self._lock, self.cached, self._remember,
            lambda: self._by_token.values(),
        )

    # -- opening and closing -------------------------------------------

    @classmethod
    async def open(cls, path: Path) -> SqliteKeystore:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = await aiosqlite.connect(path, isolation_level=None)
        try:
            await connection.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable across process crashes in WAL mode; only a
            # power loss can lose the last commits.  Key changes raise it to
            # FULL for their own commits (see _write).
            await connection.execute("PRAGMA synchronous = NORMAL")
            await connection.execute("PRAGMA busy_timeout = 5000")
            await _migrate(connection, path)
        except BaseException:
            await connection.close()
            raise
        store = cls(path, connection)
        await store._reload()
        return store

    async def close(self) -> None:
        await self.stop_watching()
        try:
            await self.ledger.close()
        finally:
            await self._db.close()

    def start_writing(self, interval: float = 0.1) -> None:
        """Write queued usage and spend every ``interval`` seconds from now on."""
        self.ledger.start(interval)

    def start_watching(self, interval: float = 1.0) -> None:
        """Pick up changes made by other processes within ``interval`` seconds."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(interval))

    async def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None

    async def _watch(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                if await self._current_data_version() != self._data_version:
                    async with self._lock:
                        await self._reload()
            except (sqlite3.Error, ValueError) as exc:
                # A busy or briefly locked file is retried on the next tick.
                logger.warning("keystore reload failed, will retry: %s", exc)

    async def _current_data_version(self) -> int:
        async with self._db.execute("PRAGMA data_version") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def _reload(self) -> None:
        self._data_version = await self._current_data_version()
        async with self._db.execute(_SELECT) as cursor:
            rows = await cursor.fetchall()
        by_token: dict[str, KeyRecord] = {}
        renamed: list[tuple[str, str]] = []
        for row in rows:
            record = _record(row)
            by_token[record.token] = record
            if record.grace_token:
                by_token[record.grace_token] = record
                before = self._by_token.get(record.grace_token)
                if before is not None and before.token == record.grace_token:
                    # Regenerated by another process since the last reload.
                    renamed.append((record.grace_token, record.token))
        self._by_token = by_token
        for old, new in renamed:
            # Counters and queued spend follow the key, as after our own regenerate.
            self.counters.rename(old, new)
            self.ledger.rename(old, new)

    async def ping(self) -> None:
        async with self._db.execute("SELECT 1") as cursor:
            await cursor.fetchone()

    # -- usage and spend (write-behind; see ledger.py) -------------------

    def record_usage(self, row: UsageRow, key: KeyRecord | None) -> None:
        self.ledger.record(row, key)

    async def spend(self, key: KeyRecord) -> tuple[float, float | None]:
        return self.ledger.spend(key)

    async def flush(self) -> None:
        await self.ledger.flush()

    async def usage_logs(
        self, where: UsageFilter, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        return await self.ledger.logs(where, offset, limit)

    async def usage_report(self, group_by: str, where: UsageFilter) -> list[dict[str, Any]]:
        return await self.ledger.report(group_by, where)

    # -- reading -------------------------------------------------------

    def cached(self, token: str) -> KeyRecord | None:
        return self._by_token.get(token)

    async def find(self, token: str) -> KeyRecord | None:
        """A key by the digest of its secret (current or within grace)."""
        record = self._by_token.get(token)
        if record is not None:
            return record
        # A miss: the key may have been created by another process a moment
        # ago, before the watcher's next tick.
        async with self._db.execute(
            f"{_SELECT} WHERE token = ? OR grace_token = ?", (token, token)
        ) as cursor:
            row = await cursor.fetchone()
        if row is None:
            return None
        record = _record(row)
        self._remember(record)
        return record

    async def find_by_alias(self, alias: str) -> KeyRecord | None:
        async with self._db.execute(f"{_SELECT} WHERE key_alias = ?", (alias,)) as cursor:
            row = await cursor.fetchone()
        return _record(row) if row else None

    async def list_keys(
        self, where: KeyFilter, offset: int, limit: int
    ) -> tuple[list[KeyRecord], int]:
        clauses, args = [], []
        for column in ("account_type", "key_alias", "user_id", "team_id"):
            value = getattr(where, column)
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        condition = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        async with self._db.execute(f"SELECT COUNT(*) FROM keys{condition}", args) as cur:
            total = (await cur.fetchone() or (0,))[0]
        async with self._db.execute(
            f"{_SELECT}{condition} ORDER BY created_at, rowid LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ) as cursor:
            rows = await cursor.fetchall()
        return [_record(row) for row in rows], int(total)

    # -- writing -------------------------------------------------------

    async def insert(self, record: KeyRecord) -> KeyRecord | None:
        values = _row(record)
        sql = (
            f"INSERT INTO keys ({', '.join(values)}) "
            f"VALUES ({', '.join('?' * len(values))})"
        )
        return await self._commit([(sql, tuple(values.values()))], refresh=record.token)

    async def update(self, token: str, changes: dict[str, Any]) -> KeyRecord | None:
        """Apply ``changes`` (KeyRecord field names) to one key; None if gone."""
        if not changes:
            return await self.find(token)
        values = _row(changes | {"updated_at": time.time()})
        assignments = ", ".join(f"{column} = ?" for column in values)
        return await self._commit(
            [(f"UPDATE keys SET {assignments} WHERE token = ?", (*values.values(), token))],
            refresh=token,
        )

    async def rotate(
        self, token: str, new_token: str, new_name: str, grace_until: float | None
    ) -> KeyRecord | None:
        """Give a key a new secret; the old one works until ``grace_until``.

        The old digest is kept even without a grace period (which then ends
        at once): spend that another process still has queued under it must
        find the key when it is written.
        """
        now = time.time()
        return await self._commit(
            [(
                "UPDATE keys SET token = ?, key_name = ?, grace_token = ?, "
                "grace_until = ?, updated_at = ? WHERE token = ?",
                (new_token, new_name, token, to_iso(grace_until or now), to_iso(now), token),
            )],
            forget=[token],
            refresh=new_token,
            renamed=(token, new_token),
        )

    async def delete(self, tokens: Iterable[str]) -> int:
        tokens = list(tokens)
        await self._commit(
            [("DELETE FROM keys WHERE token = ?", (token,)) for token in tokens],
            forget=tokens,
        )
        return len(tokens)

    async def _commit(
        self,
        statements: list[tuple[str, tuple[Any, ...]]],
        *,
        forget: Iterable[str] = (),
        refresh: str | None = None,
        renamed: tuple[str, str] | None = None,
    ) -> KeyRecord | None:
        # Shielded: a client that hangs up (which cancels its handler) must
        # never leave a change committed in SQLite but missing from memory.
        return await shielded(self._commit_now(statements, forget, refresh, renamed))

    async def _commit_now(
        self,
        statements: list[tuple[str, tuple[Any, ...]]],
        forget: Iterable[str],
        refresh: str | None,
        renamed: tuple[str, str] | None,
    ) -> KeyRecord | None:
        async with self._lock:
            changed = await self._write(statements)
            if renamed is not None and not changed:
                # Someone else changed this key first (another regenerate):
                # nothing was renamed, so counters and spend stay where they are.
                return None
            for token in forget:
                self._forget(token)
            if renamed is not None:
                # Counters and queued spend follow the key to its new digest.
                self.counters.rename(*renamed)
                self.ledger.rename(*renamed)
            return await self._refresh(refresh) if refresh is not None else None

    async def _write(self, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
        """Run the statements in one transaction; returns the rows they changed.

        A key change is answered as done, so it goes to disk before the
        answer (``synchronous = FULL``), unlike the usage ledger's batches,
        for which the connection's ``NORMAL`` is safe against a process
        crash and much cheaper.
        """
        await self._db.execute("PRAGMA synchronous = FULL")
        try:
            return await self._transaction(statements)
        finally:
            await self._db.execute("PRAGMA synchronous = NORMAL")

    async def _transaction(self, statements: list[tuple[str, tuple[Any, ...]]]) -> int:
        changed = 0
        try:
            await self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            # busy_timeout has already waited; someone else holds the file.
            raise KeystoreBusy(
                f"the database is locked by another connection ({exc}); try again"
            ) from exc
        try:
            for sql, args in statements:
                cursor = await self._db.execute(sql, args)
                changed += max(cursor.rowcount, 0)
            await self._db.execute("COMMIT")
        except sqlite3.IntegrityError as exc:
            await self._db.execute("ROLLBACK")
            if "key_alias" in str(exc):
                raise AliasTaken("key_alias is already used by another key") from exc
            raise KeyConflict("a key with this secret already exists") from exc
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        # Our own commit does not move data_version for this connection,
        # so the watcher will not reload for it; memory is updated by the
        # caller from the committed row.
        return changed

    async def _refresh(self, token: str) -> KeyRecord | None:
        async with self._db.execute(f"{_SELECT} WHERE token = ?", (token,)) as cursor:
            row = await cursor.fetchone()
        if row is None:
            self._forget(token)
            return None
        record = _record(row)
        self._remember(record)
        return record

    def _remember(self, record: KeyRecord) -> None:
        self._forget(record.token)
        self._by_token[record.token] = record
        if record.grace_token:
            self._by_token[record.grace_token] = record

    def _forget(self, token: str) -> None:
        old = self._by_token.pop(token, None)
        if old is not None:
            self._by_token.pop(old.token, None)
            if old.grace_token:
                self._by_token.pop(old.grace_token, None)


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    async with db.execute("PRAGMA user_version") as cursor:
        version = (await cursor.fetchone() or (0,))[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise RuntimeError(
            f"{path} was written by a newer Keystile (schema {version}); "
            f"this version understands schema {SCHEMA_VERSION}"
        )
    async with db.execute("SELECT COUNT(*) FROM sqlite_master") as cursor:
        empty = (await cursor.fetchone() or (0,))[0] == 0
    if empty:
        scripts = [_sql("schema.sql")]
    elif version == 0:
        raise RuntimeError(f"{path} is not a Keystile database")
    else:
        scripts = [_sql(f"migrations/{n:03d}.sql") for n in range(version + 1, SCHEMA_VERSION + 1)]
        logger.info("migrating %s from schema %d to %d", path, version, SCHEMA_VERSION)
    for script in scripts:
        try:
            await db.executescript(f"BEGIN IMMEDIATE;\n{script}\nCOMMIT;")
        except BaseException:
            if db.in_transaction:
                await db.execute("ROLLBACK")
            raise


def _sql(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def _record(row: sqlite3.Row | tuple[Any, ...]) -> KeyRecord:
    values = dict(zip(_COLUMNS, row))
    for name in _JSON_FIELDS:
        values[name] = orjson.loads(values[name])
    for name in _TIME_FIELDS:
        values[name] = from_iso(values[name])
    values["models"] = tuple(values["models"])
    values["enforced_params"] = tuple(values["enforced_params"])
    values["blocked"] = bool(values["blocked"])
    values["grace_until"] = values["grace_until"]
    return KeyRecord(**values)


def _row(fields: KeyRecord | dict[str, Any]) -> dict[str, Any]:
    """Column values for a record or a partial change of one."""
    if isinstance(fields, KeyRecord):
        fields = {name: getattr(fields, name) for name in _COLUMNS}
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name not in _COLUMNS:
            raise ValueError(f"not a key column: {name}")
        if name in _JSON_FIELDS:
            value = orjson.dumps(list(value) if isinstance(value, tuple) else value).decode()
        elif name in _TIME_FIELDS:
            value = to_iso(value)
        elif name == "blocked":
            value = int(bool(value))
        out[name] = value
    return out
