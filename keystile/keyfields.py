"""Validation of the fields that describe a key, shared by API and CLI.

Field names are LiteLLM's ``/key/generate`` names.  Every problem is a 400
that names the field, so an operator knows what to fix.
"""

from __future__ import annotations

from typing import Any

from keystore.records import (
    ACCOUNT_TYPES,
    DURATION_UNITS,
    MAX_DURATION,
    duration_seconds,
    looks_like_hash,
)

from .errors import BadRequest

__all__ = [
    "DURATION_UNITS",
    "GENERATE_FIELDS",
    "UPDATE_FIELDS",
    "parse_duration",
    "reject_unknown",
    "validate_fields",
]


GENERATE_FIELDS = frozenset({
    "key", "key_alias", "user_id", "team_id", "models", "aliases", "metadata",
    "account_type", "duration", "enforced_params", "blocked", "rpm_limit",
    "tpm_limit", "max_parallel_requests", "max_budget", "budget_duration",
})
UPDATE_FIELDS = GENERATE_FIELDS  # "key" names the key to change in an update
# Counts within SQLite's integers and JavaScript's exact numbers; amounts
# far beyond any real budget.
MAX_COUNT = 2**53
MAX_AMOUNT = 1e15


def parse_duration(value: Any, field: str) -> int:
    """Seconds in a duration such as "30s", "15m", "12h" or "30d"."""
    seconds = duration_seconds(value) if isinstance(value, str) else None
    if seconds is None:
        raise BadRequest(
            f"{field} must be a duration such as \"30s\", \"15m\", \"12h\" or \"30d\" "
            f"(at most {MAX_DURATION // 86400}d)",
            param=field,
        )
    return seconds


def _string(body: dict[str, Any], field: str) -> str | None:
    value = body[field]
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise BadRequest(f"{field} must be a non-empty string or null", param=field)
    return value.strip()


def _check_alias(alias: str) -> None:
    # Routes name a key by its secret, its digest or its alias; an alias
    # that looked like either of the others could point at another key.
    if alias.startswith("sk-") or looks_like_hash(alias):
        raise BadRequest(
            "key_alias must not start with sk- or look like a key hash "
            "(64 hexadecimal characters)",
            param="key_alias",
        )


def _names(body: dict[str, Any], field: str) -> tuple[str, ...]:
    value = body[field]
    if value is None:
        return ()
    if not isinstance(value, list) or not all(
        isinstance(item, str) and item.strip() for item in value
    ):
        raise BadRequest(f"{field} must be a list of non-empty strings", param=field)
    return tuple(dict.fromkeys(item.strip() for item in value))


def _count(body: dict[str, Any], field: str) -> int | None:
    value = body[field]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise BadRequest(f"{field} must be a whole number from 0 to {MAX_COUNT}, or null",
                         param=field)
    return value


def _amount(body: dict[str, Any], field: str) -> float | None:
    value = body[field]
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float)
            or not 0 <= value <= MAX_AMOUNT):
        # NaN fails the comparison too, as it must: it would mean "no budget".
        raise BadRequest(f"{field} must be a number from 0 to {MAX_AMOUNT:g}, or null",
                         param=field)
    return float(value)


def reject_unknown(body: dict[str, Any], allowed: set[str] | frozenset[str]) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"Unknown field(s): {', '.join(unknown)}", param=unknown[0])


def validate_fields(body: Any, allowed: frozenset[str]) -> dict[str, Any]:
    """Checked and normalised fields; ``duration`` stays as seconds or None."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    reject_unknown(body, allowed)

    out: dict[str, Any] = {}
    for field in body:
        if field in ("key_alias", "user_id", "team_id"):
            out[field] = _string(body, field)
            if field == "key_alias" and out[field] is not None:
                _check_alias(out[field])
        elif field in ("models", "enforced_params"):
            out[field] = _names(body, field)
        elif field in ("rpm_limit", "tpm_limit", "max_parallel_requests"):
            out[field] = _count(body, field)
        elif field == "max_budget":
            out[field] = _amount(body, field)
        elif field == "blocked":
            if not isinstance(body[field], bool):
                raise BadRequest("blocked must be true or false", param=field)
            out[field] = body[field]
        elif field == "metadata":
            if body[field] is not None and not isinstance(body[field], dict):
                raise BadRequest("metadata must be a JSON object", param=field)
            out[field] = body[field] or {}
        elif field == "aliases":
            aliases = body[field] or {}
            if not isinstance(aliases, dict) or not all(
                isinstance(v, str) and v.strip() and k.strip() for k, v in aliases.items()
            ):
                raise BadRequest(
                    "aliases must map public model names to model names", param=field
                )
            out[field] = {k.strip(): v.strip() for k, v in aliases.items()}
        elif field == "account_type":
            if body[field] not in ACCOUNT_TYPES:
                raise BadRequest(
                    "account_type must be \"user\" or \"service_account\"", param=field
                )
            out[field] = body[field]
        elif field in ("duration", "budget_duration"):
            out[field] = None if body[field] is None else parse_duration(body[field], field)
            if field == "budget_duration" and body[field] is not None:
                out[field] = body[field].strip()
        elif field == "key":
            out[field] = body[field]
    return out
