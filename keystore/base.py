"""What every keystore backend offers the rest of the proxy.

Only SQLite exists today.  A shared backend (PostgreSQL for keys, Redis for
counters) would implement this same protocol, chosen by ``database_url``,
so that policies and admin routes never learn which one they talk to.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .records import KeyRecord

__all__ = ["Keystore", "KeyFilter", "KeystoreError", "AliasTaken", "KeyConflict"]


class KeystoreError(Exception):
    """A change the keystore refused; the message is safe to show."""


class AliasTaken(KeystoreError):
    pass


class KeyConflict(KeystoreError):
    pass


@dataclass(frozen=True, slots=True)
class KeyFilter:
    account_type: str | None = None
    key_alias: str | None = None
    user_id: str | None = None
    team_id: str | None = None


class Keystore(Protocol):
    def cached(self, token: str) -> KeyRecord | None:
        """The key with this digest if memory holds it; never waits."""

    async def find(self, token: str) -> KeyRecord | None:
        """The key with this digest, asking storage only on a memory miss."""

    async def find_by_alias(self, alias: str) -> KeyRecord | None: ...

    async def list(
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

    def start_watching(self, interval: float = 1.0) -> None: ...

    async def close(self) -> None: ...
