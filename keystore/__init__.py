"""Storage of virtual keys, usage and spend, and the rate-limit counters.

The only package that speaks SQL."""

from __future__ import annotations

from pathlib import Path

from .base import (
    Admission,
    AliasTaken,
    Counters,
    KeyConflict,
    KeyFilter,
    Keystore,
    KeystoreBusy,
    KeystoreError,
    UsageFilter,
)
from .records import (
    KeyRecord,
    UsageRow,
    display_name,
    hash_key,
    looks_like_hash,
    new_key,
)
from .sqlite import SqliteKeystore

__all__ = [
    "Admission",
    "AliasTaken",
    "Counters",
    "KeyConflict",
    "KeyFilter",
    "KeyRecord",
    "Keystore",
    "KeystoreBusy",
    "KeystoreError",
    "SqliteKeystore",
    "UsageFilter",
    "UsageRow",
    "display_name",
    "hash_key",
    "looks_like_hash",
    "new_key",
    "open_keystore",
]


async def open_keystore(path: Path) -> Keystore:
    return await SqliteKeystore.open(path)
