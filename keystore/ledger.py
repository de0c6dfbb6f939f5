"""The usage ledger and key spend: one write-behind path into SQLite.

The request path only appends to memory (``record``).  A background task
writes what has gathered every ``interval`` seconds (sooner when a batch is
large): the usage rows and the spend increments of one batch commit in one
transaction, so a row and the spend it caused are never apart.  Spend is
only ever written as ``spend = spend + ?`` (or set to 0 when a budget
period ends), never as a value read earlier.

Until a batch commits, its spend is still counted: ``spend`` layers what is
being written and what is queued over the key's committed value, so a
budget check never sees less than the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import aiosqlite

from .base import KeystoreBusy, UsageFilter
from .records import KeyRecord, UsageRow, to_iso
from .shield import shielded

__all__ = ["REPORT_GROUPS", "UsageLedger"]

logger = logging.getLogger(__name__)

# A batch this large is written without waiting for the interval to end.
_LARGE_BATCH = 512
# Tries to write what is queued at shutdown while the file is locked; each
# waits SQLite's busy timeout (5 s).
_CLOSE_ATTEMPTS = 6
# Idle keys whose budget period ended get their reset written this often.
_SWEEP_INTERVAL = 1.0

_ROW_COLUMNS = (
    "time", "key_hash", "key_alias", "account_type", "end_user", "endpoint",
    "model_group", "deployment_id", "status", "prompt_tokens", "completion_tokens",
    "cost", "latency_ms", "ttfb_ms", "estimated",
)
# Rows go in many to a statement, never one statement per row: Python's
# sqlite3 lets go of the GIL around every statement step, and while the
# event loop is busy, taking it back can wait for the interpreter's whole
# switch interval (5 ms).  Row by row, a batch of a few hundred took
# hundreds of milliseconds under load.  Full chunks share one statement,
# compiled once; the rest of a batch gets one statement of its own size.
# 64 rows of 15 values stay under the 999 parameters old SQLite allows.
_ROWS_PER_INSERT = 64
_PLACEHOLDERS = f"({', '.join('?' * len(_ROW_COLUMNS))})"
_INSERT = f"INSERT INTO usage ({', '.join(_ROW_COLUMNS)}) VALUES "
_INSERT_CHUNK = _INSERT + ", ".join([_PLACEHOLDERS] * _ROWS_PER_INSERT)
# Spend changes of many keys, in one statement for the same reason: the
# pairs arrive as a VALUES table (columns column1, column2).  A change queued
# under a key's previous digest (regenerated meanwhile by another process)
# still reaches it through grace_token.
_ADD_SPEND = (
    "WITH delta AS (VALUES {pairs}) UPDATE keys SET spend = spend + "
    "(SELECT total(column2) FROM delta WHERE column1 IN (keys.token, keys.grace_token)) "
    "WHERE token IN (SELECT column1 FROM delta) OR grace_token IN (SELECT column1 FROM delta)"
)
_RESET_SPEND = (
    "WITH due AS (VALUES {pairs}) UPDATE keys SET spend = 0, budget_reset_at = "
    "(SELECT max(column2) FROM due WHERE column1 IN (keys.token, keys.grace_token)) "
    "WHERE token IN (SELECT column1 FROM due) OR grace_token IN (SELECT column1 FROM due)"
)
# Pairs per spend statement: far below any SQLite limit on parameters.
_KEYS_PER_UPDATE = 400
# The same aggregate columns as the spend_by_* views in schema.sql.
_TOTALS = (
    "COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, "
    "SUM(completion_tokens) AS completion_tokens, "
    "SUM(prompt_tokens + completion_tokens) AS total_tokens, SUM(cost) AS cost, "
    "SUM(estimated) AS estimated_requests, MIN(time) AS first_request, "
    "MAX(time) AS last_request"
)
REPORT_GROUPS = {
    "key": "key_hash, MAX(key_alias) AS key_alias",
    "user": "end_user",
    "model": "model_group",
}
_GROUP_BY = {"key": "key_hash", "user": "end_user", "model": "model_group"}


@dataclass(slots=True)
class _SpendChange:
    """What is not yet written to one key's spend: a reset, then an increment."""

    reset_to: float | None = None  # set: spend went to 0, the period now ends here
    delta: float = 0.0

    def apply(self, spend: float, reset_at: float | None) -> tuple[float, float | None]:
        if self.reset_to is not None:
            return self.delta, self.reset_to
        return spend + self.delta, reset_at

    def then(self, newer: _SpendChange) -> _SpendChange:
        if newer.reset_to is not None:
            return newer
        return _SpendChange(self.reset_to, self.delta + newer.delta)


class UsageLedger:
    """Queued usage and spend for one SQLite connection; see the module docstring."""

    def __init__(
        self,
        db: aiosqlite.Connection,
        lock: asyncio.Lock,
        lookup: Callable[[str], KeyRecord | None],
        remember: Callable[[KeyRecord], None],
        records: Callable[[], Iterable[KeyRecord]],
    ) -> None:
        self._db = db
        self._lock = lock
        self._lookup = lookup
        self._remember = remember
        self._records = records
        self._rows: list[UsageRow] = []
        self._pending: dict[str, _SpendChange] = {}
        self._flushing: dict[str, _SpendChange] = {}
        self._renamed: dict[str, str] = {}
        # When the oldest row or change not yet taken by a flush was queued:
        # the write deadline counts from it, not from the end of the last
        # write, so a slow write does not push the next one later.
        self._queued_at: float | None = None
        self._wake = asyncio.Event()
        self._large = asyncio.Event()
        self._closing = False
        self._closed = asyncio.Event()  # set by close(): ends any pause at once
        self._writer: asyncio.Task[None] | None = None

    # -- the request path: memory only ----------------------------------

    def record(self, row: UsageRow, key: KeyRecord | None) -> None:
        self._rows.append(row)
        if key is not None:
            token = self._renamed.get(key.token, key.token)
            spend, reset_at = self._view(token, key)
            due = key.next_budget_reset(reset_at, time.time())
            if due is not None or row.cost:
                change = self._pending.get(token)
                if change is None:
                    change = self._pending[token] = _SpendChange()
                if due is not None:
                    change.reset_to, change.delta = due, 0.0
                change.delta += row.cost
        if self._queued_at is None:
            self._queued_at = time.monotonic()
        if not self._wake.is_set():
            self._wake.set()
        if len(self._rows) >= _LARGE_BATCH:
            self._large.set()

    def spend(self, key: KeyRecord) -> tuple[float, float | None]:
        token = self._renamed.get(key.token, key.token)
        spend, reset_at = self._view(token, key)
        if key.next_budget_reset(reset_at, time.time()) is not None:
            # The period is over; its reset is simply not written yet.
            return 0.0, key.next_budget_reset(reset_at, time.time())
        return spend, reset_at

    def _view(self, token: str, key: KeyRecord) -> tuple[float, float | None]:
        current = self._lookup(token) or key
        spend, reset_at = current.spend, current.budget_reset_at
        for layer in (self._flushing.get(token), self._pending.get(token)):
            if layer is not None:
                spend, reset_at = layer.apply(spend, reset_at)
        return spend, reset_at

    def rename(self, old: str, new: str) -> None:
        """A regenerated key: spend recorded under its old digest goes to the new one.

        Called under the keystore lock, so nothing is being written.
        """
        change = self._pending.pop(old, None)
        if change is not None:
            # After a regenerate by another process, the new digest may
            # have spend of its own already; the old digest's came first.
            newer = self._pending.get(new)
            self._pending[new] = change.then(newer) if newer is not None else change
        for before, after in self._renamed.items():
            if after == old:
                self._renamed[before] = new
        self._renamed[old] = new

    # -- the writer -------------------------------------------------------

    def start(self, interval: float) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._run(interval))

    async def close(self) -> None:
        """Stop the writer and write everything still queued.

        While another process holds the file, keep trying (each try waits
        SQLite's busy timeout) for a while before giving up with an error:
        a shutdown should not drop usage because of someone's sqlite3 shell.
        """
        self._closing = True
        self._closed.set()
        self._wake.set()
        self._large.set()
        if self._writer is not None:
            await self._writer
            self._writer = None
        for _ in range(_CLOSE_ATTEMPTS - 1):
            try:
                await self.flush()
                return
            except (sqlite3.OperationalError, KeystoreBusy) as exc:
                logger.warning("usage ledger: %d row(s) not written yet at shutdown (%s); "
                               "trying again", len(self._rows), exc)
        try:
            await self.flush()
        except (sqlite3.OperationalError, KeystoreBusy) as exc:
            logger.error("usage ledger: %d usage row(s) and the spend of %d key(s) were not "
                         "written: %s", len(self._rows), len(self._pending), exc)

    async def _run(self, interval: float) -> None:
        swept = time.monotonic()
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), _SWEEP_INTERVAL)
            except TimeoutError:
                pass
            # Cleared before anything else: a wake-up whose rows someone else
            # already flushed must not make this loop spin.
            self._wake.clear()
            if time.monotonic() - swept >= _SWEEP_INTERVAL:
                swept = time.monotonic()
                self._sweep()
            if not self._rows and not self._pending:
                continue
            queued_at = self._queued_at if self._queued_at is not None else time.monotonic()
            wait = queued_at + interval - time.monotonic()
            if not self._closing and wait > 0:
                try:
                    await asyncio.wait_for(self._large.wait(), wait)
                except TimeoutError:
                    pass
            self._large.clear()
            try:
                await self.flush()
            except (sqlite3.Error, KeystoreBusy, ValueError) as exc:
                # Kept in memory and tried again with the next batch.
                logger.warning("usage ledger write failed, will retry: %s", exc)
                await self._pause(interval)
            except Exception:
                # Kept in memory too; the writer must outlive a bug in one batch.
                logger.exception("usage ledger write failed, will retry")
                await self._pause(interval)

    async def _pause(self, seconds: float) -> None:
        # After a failed write; a shutdown does not wait for it to end.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closed.wait(), seconds)

    def _sweep(self) -> None:
        now = time.time()
        for key in {id(k): k for k in self._records()}.values():
            if key.budget_duration is None:
                continue
            _, reset_at = self._view(key.token, key)
            due = key.next_budget_reset(reset_at, now)
            if due is not None:
                self._pending[key.token] = _SpendChange(due, 0.0)

    async def flush(self) -> None:
        """Write everything queued now.

        Shielded: aiosqlite runs a statement already handed to it even when
        its caller is cancelled (a client hanging up on /spend/logs), so a
        cancel in the middle of a transaction would leave it open or, just
        after COMMIT, make a written batch look unwritten.
        """
        await shielded(self._flush_now())

    async def _flush_now(self) -> None:
        async with self._lock:
            if not self._rows and not self._pending:
                return
            rows, self._rows = self._rows, []
            self._flushing, self._pending = self._pending, {}
            self._queued_at = None
            try:
                await self._write(rows, self._flushing)
            except (sqlite3.OperationalError, KeystoreBusy, ValueError, TypeError,
                    OverflowError, sqlite3.InterfaceError) as exc:
                if isinstance(exc, (sqlite3.OperationalError, KeystoreBusy)):
                    self._put_back(rows)
                    raise
                # Something in this batch can never be written; it must not
                # hold back everything queued behind it.
                await self._salvage(rows, self._flushing)
            except BaseException:
                # Nothing was written: put it all back in front of what came since.
                self._put_back(rows)
                raise
            self._committed()

    def _committed(self) -> None:
        """Memory takes the spend just committed, in the same step that stops
        counting it as being written: no await in between."""
        for token, change in self._flushing.items():
            key = self._lookup(token)
            # Under its previous digest too: the SQL found the key that way.
            if key is not None and token in (key.token, key.grace_token):
                spend, reset_at = change.apply(key.spend, key.budget_reset_at)
                self._remember(replace(key, spend=spend, budget_reset_at=reset_at))
        self._flushing = {}

    def _put_back(self, rows: list[UsageRow]) -> None:
        self._rows[:0] = rows
        self._queued_at = time.monotonic()
        self._wake.set()
        for token, change in self._pending.items():
            older = self._flushing.get(token)
            self._flushing[token] = older.then(change) if older else change
        self._pending, self._flushing = self._flushing, {}

    async def _salvage(self, rows: list[UsageRow], changes: dict[str, _SpendChange]) -> None:
        """Write a batch piece by piece, dropping (and logging) what SQLite refuses.

        A locked or failing file is not a bad row: what is not written yet
        goes back in the queue and the error is raised.
        """
        try:
            await self._write([], changes)
        except (sqlite3.OperationalError, KeystoreBusy):
            self._put_back(rows)
            raise
        except (ValueError, TypeError, OverflowError, sqlite3.Error):
            logger.exception("usage ledger: dropped spend changes for %d key(s)", len(changes))
        for index, row in enumerate(rows):
            try:
                await self._write([row], {})
            except (sqlite3.OperationalError, KeystoreBusy):
                # The spend is written: only the rows still to go wait.
                self._rows[:0] = rows[index:]
                self._queued_at = time.monotonic()
                self._committed()
                raise
            except (ValueError, TypeError, OverflowError, sqlite3.Error):
                logger.exception("usage ledger: dropped a usage row of key %s at %s",
                                 row.key_alias or row.key_hash, row.time)

    async def _write(self, rows: list[UsageRow], changes: dict[str, _SpendChange]) -> None:
        resets: list[tuple[str, Any]] = [
            (token, to_iso(change.reset_to)) for token, change in changes.items()
            if change.reset_to is not None
        ]
        increments: list[tuple[str, Any]] = [
            (token, change.delta) for token, change in changes.items() if change.delta
        ]
        try:
            await self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            # busy_timeout has already waited: another process holds the file.
            raise KeystoreBusy(f"the database is locked by another connection ({exc})") from exc
        try:
            whole = len(rows) - len(rows) % _ROWS_PER_INSERT
            if whole:
                await self._db.executemany(_INSERT_CHUNK, [
                    [value for row in rows[start:start + _ROWS_PER_INSERT]
                     for value in _values(row)]
                    for start in range(0, whole, _ROWS_PER_INSERT)
                ])
            if whole < len(rows):
                await self._db.execute(
                    _INSERT + ", ".join([_PLACEHOLDERS] * (len(rows) - whole)),
                    [value for row in rows[whole:] for value in _values(row)],
                )
            # Resets before increments: spend earned after a reset counts
            # in the new period.
            for statement, pairs in ((_RESET_SPEND, resets), (_ADD_SPEND, increments)):
                for start in range(0, len(pairs), _KEYS_PER_UPDATE):
                    chunk = pairs[start:start + _KEYS_PER_UPDATE]
                    await self._db.execute(
                        statement.format(pairs=", ".join(["(?, ?)"] * len(chunk))),
                        [value for pair in chunk for value in pair],
                    )
            await self._db.execute("COMMIT")
        except BaseException:
            # SQLite ends some failed transactions itself; roll back only an
            # open one, so that the error raised is the one that happened.
            if self._db.in_transaction:
                await self._db.execute("ROLLBACK")
            raise

    # -- reading ----------------------------------------------------------

    async def logs(
        self, where: UsageFilter, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        condition, args = _where(where)
        async with self._db.execute(f"SELECT COUNT(*) FROM usage{condition}", args) as cur:
            total = (await cur.fetchone() or (0,))[0]
        async with self._db.execute(
            f"SELECT id, {', '.join(_ROW_COLUMNS)} FROM usage{condition} "
            "ORDER BY id DESC LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ) as cursor:
            names = [d[0] for d in cursor.description]
            rows = await cursor.fetchall()
        logs = []
        for row in rows:
            entry = dict(zip(names, row))
            entry["estimated"] = bool(entry["estimated"])
            logs.append(entry)
        return logs, int(total)

    async def report(self, group_by: str, where: UsageFilter) -> list[dict[str, Any]]:
        condition, args = _where(where)
        async with self._db.execute(
            f"SELECT {REPORT_GROUPS[group_by]}, {_TOTALS} FROM usage{condition} "
            f"GROUP BY {_GROUP_BY[group_by]} ORDER BY cost DESC, requests DESC",
            args,
        ) as cursor:
            names = [d[0] for d in cursor.description]
            rows = await cursor.fetchall()
        return [dict(zip(names, row)) for row in rows]


class _IsoTimes:
    """``to_iso`` for many times close together: the second is formatted once."""

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self, moment: float) -> str:
        # Rounded to the microsecond the way datetime.fromtimestamp does.
        fraction, whole = math.modf(moment)
        micro = round(fraction * 1_000_000)
        second = int(whole)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        if second != self._second:
            self._second = second
            self._prefix = str(to_iso(float(second)))[:-5]  # without ".000Z"
        return f"{self._prefix}.{micro // 1000:03d}Z"


_iso = _IsoTimes()
# SQLite's INTEGER is a signed 64-bit number.
_MAX_INTEGER = (1 << 63) - 1


def _values(row: UsageRow) -> tuple[Any, ...]:
    return (
        _iso(row.time), row.key_hash, _text(row.key_alias), row.account_type,
        _text(row.end_user), row.endpoint, _text(row.model_group), row.deployment_id,
        row.status, _integer(row.prompt_tokens), _integer(row.completion_tokens), row.cost,
        round(row.latency_ms, 3), None if row.ttfb_ms is None else round(row.ttfb_ms, 3),
        int(row.estimated),
    )


def _text(value: str | None) -> str | None:
    # Header values reach us with undecodable bytes as lone surrogates,
    # which SQLite cannot store; one such row must not block the others.
    if value is None:
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-8", "replace").decode("utf-8")
    return value


def _integer(value: int) -> int:
    return max(0, min(value, _MAX_INTEGER))


def _where(where: UsageFilter) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    for column in ("key_hash", "key_alias", "end_user", "model_group"):
        value = getattr(where, column)
        if value is not None:
            clauses.append(f"{column} = ?")
            args.append(value)
    # Times are stored as sortable ISO text, so text comparison is time order.
    if where.start is not None:
        clauses.append("time >= ?")
        args.append(to_iso(where.start))
    if where.end is not None:
        clauses.append("time < ?")
        args.append(to_iso(where.end))
    return (f" WHERE {' AND '.join(clauses)}" if clauses else ""), args
