"""Key records as the rest of the proxy sees them, and the key format.

Nothing here touches storage: a backend turns its rows into ``KeyRecord``
objects, and the policies and admin routes work only with those.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "ACCOUNT_TYPES",
    "KeyRecord",
    "UsageRow",
    "display_name",
    "duration_seconds",
    "from_iso",
    "hash_key",
    "looks_like_hash",
    "new_key",
    "to_iso",
]

ACCOUNT_TYPES = ("user", "service_account")
_HASH = re.compile(r"[0-9a-f]{64}")
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(\d{1,9})([smhd])")
# A hundred years: any longer lifetime or period would leave the calendar
# that timestamps can be written in.
MAX_DURATION = 100 * 365 * 86400


def duration_seconds(text: str) -> int | None:
    """Seconds in a duration such as "30s", "15m", "12h" or "30d"; None if not one."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        return None
    seconds = int(match.group(1)) * DURATION_UNITS[match.group(2)]
    return seconds if 0 < seconds <= MAX_DURATION else None


def new_key() -> str:
    # 32 random bytes: twice the 128 bits a bearer secret needs.
    return "sk-" + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The stored form of a key: SHA-256 hex of the whole string.

    This is the scheme LiteLLM's proxy uses, so its key rows can be
    imported without asking every client for a new key.
    """
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def display_name(key: str) -> str:
    return "sk-..." + key[-4:]


def looks_like_hash(value: str) -> bool:
    return _HASH.fullmatch(value) is not None


def to_iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.fromtimestamp(timestamp, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def from_iso(text: str | None) -> float | None:
    if not text:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """One virtual key, without its secret."""

    token: str
    key_name: str
    created_at: float
    updated_at: float
    key_alias: str | None = None
    account_type: str = "user"
    user_id: str | None = None
    team_id: str | None = None
    models: tuple[str, ...] = ()
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    enforced_params: tuple[str, ...] = ()
    blocked: bool = False
    expires_at: float | None = None
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    max_parallel_requests: int | None = None
    max_budget: float | None = None
    budget_duration: str | None = None
    budget_reset_at: float | None = None
    spend: float = 0.0
    grace_token: str | None = None
    grace_until: float | None = None

    @property
    def is_service_account(self) -> bool:
        return self.account_type == "service_account"

    def retired(self, token: str, now: float) -> bool:
        """Whether ``token`` is this key's previous digest, past its grace period."""
        return token == self.grace_token and (
            self.grace_until is None or now >= self.grace_until
        )

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at

    @property
    def has_limits(self) -> bool:
        """Whether any rate limit or budget applies to this key."""
        return not (
            self.rpm_limit is None and self.tpm_limit is None
            and self.max_parallel_requests is None and self.max_budget is None
        )

    def next_budget_reset(self, reset_at: float | None, now: float) -> float | None:
        """The end of the budget period ``now`` falls in, when ``reset_at`` has passed.

        None while the current period lasts (or for a key without a period).
        Periods keep their phase: a key idle for three periods resets to the
        end of the one ``now`` is in, not to ``now`` plus one period.
        """
        if reset_at is None or now < reset_at or self.budget_duration is None:
            return None
        period = duration_seconds(self.budget_duration)
        if period is None:
            return None
        return reset_at + period * (int((now - reset_at) // period) + 1)

    def public(self) -> dict[str, Any]:
        """The key as the admin API shows it: never a secret, only the digest."""
        return {
            "token": self.token,
            "key_name": self.key_name,
            "key_alias": self.key_alias,
            "account_type": self.account_type,
            "user_id": self.user_id,
            "team_id": self.team_id,
            "models": list(self.models),
            "aliases": self.aliases,
            "metadata": self.metadata,
            "enforced_params": list(self.enforced_params),
            "blocked": self.blocked,
            "expires": to_iso(self.expires_at),
            "created_at": to_iso(self.created_at),
            "updated_at": to_iso(self.updated_at),
            "rpm_limit": self.rpm_limit,
            "tpm_limit": self.tpm_limit,
            "max_parallel_requests": self.max_parallel_requests,
            "max_budget": self.max_budget,
            "budget_duration": self.budget_duration,
            "budget_reset_at": to_iso(self.budget_reset_at),
            "spend": self.spend,
            "grace_until": to_iso(self.grace_until),
        }


@dataclass(slots=True)
class UsageRow:
    """One request in the usage ledger, as the proxy measured it."""

    time: float  # when the request arrived (Unix seconds)
    key_hash: str | None  # None for the master key
    key_alias: str | None
    account_type: str  # "user", "service_account" or "master"
    end_user: str | None
    endpoint: str
    model_group: str | None
    deployment_id: str | None
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    latency_ms: float = 0.0
    ttfb_ms: float | None = None
    estimated: bool = False
