"""What every keystore backend offers the rest of the proxy.

Only SQLite exists today.  A shared backend (PostgreSQL for keys, Redis for
counters) would implement this same protocol, chosen by ``database_url``,
so that policies and admin routes never learn which one they talk to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .records import KeyRecord, UsageRow

__all__ = [
    "Admission",
    "AliasTaken",
    "Counters",
    "KeyConflict",
    "KeyFilter",
    "Keystore",
    "KeystoreBusy",
    "KeystoreError",
    "UsageFilter",
]


class KeystoreError(Exception):
    """A change the keystore refused; the message is safe to show."""


class AliasTaken(KeystoreError):
    pass


class KeyConflict(KeystoreError):
    pass


class KeystoreBusy(KeystoreError):
    """Storage is locked by someone else (another process holding a write)."""


@dataclass(frozen=True, slots=True)
class KeyFilter:
    account_type: str | None = None
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None


@dataclass(slots=True)
class Admission:
    """The answer of a rate-limit check.

    ``refused`` names the limit that said no (None: admitted); ``headers``
    are the ``x-ratelimit-*`` headers (and ``Retry-After`` on a refusal);
    ``handle`` is what ``Counters.release`` gives back, if anything was taken.
    """

    refused: str | None
    message: str
    retry_after: int
    headers: dict[str, str]
    handle: Any = None


class Counters(Protocol):
    """Per-key rate-limit counters (in memory today, Redis for replicas)."""

    async def admit(self, key: KeyRecord, *, reserve: bool = True) -> Admission:
        """Check rpm, tpm and parallel limits; count the request only if all pass."""

    async def release(self, admission: Admission) -> None:
        """End the request an admission counted as in flight."""

    async def add_tokens(self, key: KeyRecord, tokens: int) -> None: ...

    async def usage(self, key: KeyRecord) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class UsageFilter:
    key_hash: str | None = None
    key_alias: str | None = None
    end_user: str | None = None
    model_group: str | None = None
    start: float | None = None  # inclusive, Unix seconds
    end: float | None = None  # exclusive


class Keystore(Protocol):
    @property
    def counters(self) -> Counters:
        """The rate-limit counters that go with this storage."""

    def cached(self, token: str) -> KeyRecord | None:
        """The key with this digest if memory holds it; never waits."""

    async def find(self, token: str) -> KeyRecord | None:
        """The key with this digest, asking storage only on a memory miss."""

    async def find_by_alias(self, alias: str) -> KeyRecord | None: ...

    async def list_keys(
        self, where: KeyFilter, offset: int, limit: int
    ) -> tuple[list[KeyRecord], int]: ...

    async def insert(self, record: KeyRecord) -> KeyRecord | None:
        """Store a new key; raise AliasTaken or KeyConflict on a clash."""

    async def update(self, token: str, changes: dict[str, Any]) -> KeyRecord | None: ...

    async def rotate(
        self, token: str, new_token: str, new_name: str, grace_until: float | None
    ) -> KeyRecord | None: ...

    async def delete(self, tokens: Iterable[str]) -> int: ...

    async def ping(self) -> None: ...

    def record_usage(self, row: UsageRow, key: KeyRecord | None) -> None:
        """Queue a ledger row and add its cost to the key's spend; never waits.

        The row and the spend reach storage together, in the next batch.
        """

    async def spend(self, key: KeyRecord) -> tuple[float, float | None]:
        """The key's spend in its current budget period, counting what is
        still queued, and the end of that period."""

    async def flush(self) -> None:
        """Write everything queued so far before returning."""

    async def usage_logs(
        self, where: UsageFilter, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], int]: ...

    async def usage_report(self, group_by: str, where: UsageFilter) -> list[dict[str, Any]]: ...

    def start_watching(self, interval: float = 1.0) -> None: ...

    def start_writing(self, interval: float = 0.1) -> None:
        """Start the background writer of queued usage and spend."""

    async def close(self) -> None: ...
