"""Authentication: the master key or a virtual key, by digest."""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Mapping

from keystile.errors import Unauthenticated
from keystore import KeyRecord, Keystore, display_name, hash_key
from keystore.records import to_iso

from .base import Context, Policy

__all__ = ["Authenticate", "credential"]

logger = logging.getLogger(__name__)


def credential(headers: Mapping[str, str]) -> str | None:
    """The key a client presented, from the headers OpenAI-style clients use.

    ``Authorization: Bearer`` comes first; ``api-key`` is what Azure
    clients send and ``x-api-key`` what Anthropic-style clients send.
    """
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, value = authorization.strip().partition(" ")
        value = value.strip()
        if scheme.lower() != "bearer" or not value or " " in value:
            raise Unauthenticated(
                "Malformed Authorization header: expected 'Bearer <key>'",
                param="key",
            )
        return _printable(value)
    for name in ("api-key", "x-api-key"):
        value = headers.get(name, "").strip()
        if value:
            return _printable(value)
    return None


def _printable(key: str) -> str:
    # Every key is printable ASCII; anything else (raw bytes decoded as
    # surrogates included) is refused before it can reach a message.
    if not (key.isascii() and key.isprintable()):
        raise Unauthenticated("An API key is printable ASCII: this one is not", param="key")
    return key


class Authenticate(Policy):
    name = "auth"

    def __init__(self, keystore: Keystore, master_key: str | None) -> None:
        self.keystore = keystore
        self._master = master_key.encode() if master_key else None

    async def check(self, ctx: Context) -> None:
        if ctx.key is not None or ctx.is_master:
            return  # already authenticated by the handler, before the body
        if ctx.named_key is not None and ctx.dry_run:
            self._admit(ctx, ctx.named_key, ctx.named_key.key_name, time.time())
            return
        presented = credential(ctx.headers)
        if presented is None:
            raise Unauthenticated(
                "No API key provided: send 'Authorization: Bearer <key>'",
                param="key",
            )
        if self._master is not None and hmac.compare_digest(
            presented.encode("utf-8", "surrogatepass"), self._master
        ):
            ctx.is_master = True
            ctx.notes[self.name] = "the master key"
            return

        token = hash_key(presented)
        record = self.keystore.cached(token) or await self.keystore.find(token)
        now = time.time()
        if record is not None and record.retired(token, now):
            record = None
        if record is None:
            raise Unauthenticated(f"Invalid API key {display_name(presented)}", param="key")
        self._admit(ctx, record, presented, now)

    def _admit(self, ctx: Context, record: KeyRecord, presented: str, now: float) -> None:
        """Let a known key through unless it is blocked or expired."""
        # Only refusals name the key, so its display form is made only then.
        if record.blocked:
            raise Unauthenticated(f"API key {display_name(presented)} is blocked", param="key")
        if record.expired(now):
            raise Unauthenticated(
                f"API key {display_name(presented)} expired at {to_iso(record.expires_at)}",
                param="key",
                type="expired_key",
            )
        ctx.key = record
        ctx.notes[self.name] = f"virtual key {record.key_name}"
