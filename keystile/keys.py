"""The key lifecycle: generate, find, change, rotate and delete keys.

Both the admin API and the command line go through this one service, so
they apply the same rules and give the same errors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from keystore import (
    AliasTaken,
    KeyConflict,
    KeyFilter,
    KeyRecord,
    Keystore,
    display_name,
    hash_key,
    looks_like_hash,
    new_key,
)

from .errors import BadRequest, Conflict, NotFound
from .keyfields import parse_duration

__all__ = ["KeyService", "Page"]

MAX_PAGE_SIZE = 100
_ROTATE_TRIES = 5


@dataclass(frozen=True, slots=True)
class Page:
    keys: list[KeyRecord]
    total_count: int
    current_page: int
    total_pages: int


def _record_fields(fields: dict[str, Any], now: float) -> dict[str, Any]:
    """KeyRecord field values for validated API fields."""
    out = {
        name: value for name, value in fields.items()
        if name not in ("key", "duration", "budget_duration")
    }
    if "duration" in fields:
        seconds = fields["duration"]
        out["expires_at"] = None if seconds is None else now + seconds
    if "budget_duration" in fields:
        period = fields["budget_duration"]
        out["budget_duration"] = period
        out["budget_reset_at"] = (
            None if period is None else now + parse_duration(period, "budget_duration")
        )
    return out


def _account_type(fields: dict[str, Any], current: str = "user") -> str:
    # LiteLLM marks service accounts by metadata.service_account_id; that
    # keeps working, but it may not contradict an explicit account_type.
    metadata = fields.get("metadata") or {}
    by_metadata = bool(metadata.get("service_account_id"))
    explicit = fields.get("account_type")
    if by_metadata and explicit == "user":
        raise BadRequest(
            "metadata.service_account_id makes this a service account, "
            "which contradicts account_type \"user\"",
            param="account_type",
        )
    if by_metadata:
        return "service_account"
    return explicit or current


class KeyService:
    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore

    async def generate(
        self, fields: dict[str, Any], *, service_account: bool = False
    ) -> tuple[str, KeyRecord]:
        """Create a key; returns the raw key (its only appearance) and the record."""
        raw = fields.get("key")
        if raw is None:
            raw = new_key()
        elif not (isinstance(raw, str) and raw.startswith("sk-") and len(raw) >= 20
                  and raw.isascii() and raw.isprintable() and " " not in raw):
            raise BadRequest(
                "key must start with sk-, be at least 20 characters and be "
                "printable ASCII without spaces",
                param="key",
            )
        now = time.time()
        account_type = _account_type(fields)
        if service_account:
            if fields.get("account_type") == "user":
                raise BadRequest(
                    "This route creates service accounts; account_type must not be \"user\"",
                    param="account_type",
                )
            account_type = "service_account"
        values = _record_fields(fields, now) | {"account_type": account_type}
        record = KeyRecord(
            token=hash_key(raw),
            key_name=display_name(raw),
            created_at=now,
            updated_at=now,
            **values,
        )
        try:
            stored = await self.keystore.insert(record)
        except AliasTaken as exc:
            raise BadRequest(str(exc), param="key_alias") from exc
        except KeyConflict as exc:
            raise BadRequest(str(exc), param="key") from exc
        assert stored is not None
        return raw, stored

    async def lookup(self, ref: Any, param: str = "key") -> KeyRecord:
        """A key named by its secret, its digest or its alias.

        The three never overlap (an alias may not look like a key or a
        digest), so a name means one key only; under ``key_aliases`` a
        name is only ever an alias.
        """
        if not isinstance(ref, str) or not ref.strip():
            raise BadRequest(f"{param} must name a key (key, hash or alias)", param=param)
        ref = ref.strip()
        if param == "key_aliases":
            record = await self.keystore.find_by_alias(ref)
        elif ref.startswith("sk-") or looks_like_hash(ref):
            digest = hash_key(ref) if ref.startswith("sk-") else ref
            record = await self.keystore.find(digest)
            if record is not None and record.retired(digest, time.time()):
                # A secret that no longer works names no key either.
                record = None
        else:
            record = await self.keystore.find_by_alias(ref)
        if record is None:
            shown = display_name(ref) if ref.startswith("sk-") else ref
            raise NotFound(f"No key matches {shown!r}", param=param)
        return record

    async def update(self, ref: Any, fields: dict[str, Any]) -> KeyRecord:
        record = await self.lookup(ref)
        changes = _record_fields(fields, time.time())
        if "account_type" in fields or "metadata" in fields:
            merged = {"metadata": record.metadata} | fields
            changes["account_type"] = _account_type(merged, record.account_type)
        try:
            updated = await self.keystore.update(record.token, changes)
        except AliasTaken as exc:
            raise BadRequest(str(exc), param="key_alias") from exc
        if updated is None:
            raise NotFound("The key was deleted while it was being changed", param="key")
        return updated

    async def delete(self, refs: list[tuple[Any, str]]) -> list[str]:
        """Delete all the keys named as (reference, field), or none if any is unknown."""
        records = [await self.lookup(ref, param) for ref, param in refs]
        tokens = list(dict.fromkeys(record.token for record in records))
        await self.keystore.delete(tokens)
        return tokens

    async def regenerate(self, ref: Any, grace_seconds: int | None) -> tuple[str, KeyRecord]:
        """A new secret for the key; the old one works for ``grace_seconds``.

        Only one earlier secret is kept: a regenerate ends the grace period
        of the one before.
        """
        # Two regenerates of one key may race; the loser finds the key under
        # its new digest and rotates from there, so both succeed in turn.
        for _ in range(_ROTATE_TRIES):
            record = await self.lookup(ref)
            raw = new_key()
            grace_until = time.time() + grace_seconds if grace_seconds else None
            rotated = await self.keystore.rotate(
                record.token, hash_key(raw), display_name(raw), grace_until
            )
            if rotated is not None:
                return raw, rotated
        raise Conflict("The key changed during each attempt to regenerate it; try again",
                       param="key")

    async def list(self, where: KeyFilter, page: int, size: int) -> Page:
        size = max(1, min(size, MAX_PAGE_SIZE))
        page = max(1, page)
        keys, total = await self.keystore.list_keys(where, (page - 1) * size, size)
        return Page(keys, total, page, max(1, -(-total // size)))
