"""Storage of virtual keys.  The only package that speaks SQL."""

from __future__ import annotations

from pathlib import Path

from .base import AliasTaken, KeyConflict, KeyFilter, Keystore, KeystoreError
from .records import KeyRecord, display_name, hash_key, looks_like_hash, new_key
from .sqlite import SqliteKeystore

__all__ = [
    "AliasTaken",
    "KeyConflict",
    "KeyFilter",
    "KeyRecord",
    "Keystore",
    "KeystoreError",
    "SqliteKeystore",
    "display_name",
    "hash_key",
    "looks_like_hash",
    "new_key",
    "open_keystore",
]


async def open_keystore(path: Path) -> Keystore:
    return await SqliteKeystore.open(path)
