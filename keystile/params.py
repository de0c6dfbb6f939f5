"""Reading admin route input: query parameters and JSON answers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from .errors import BadRequest

__all__ = ["json_response", "moment", "parse_json", "positive_int"]

# Far beyond any real page number, and safe inside SQLite's OFFSET.
MAX_PAGE = 10**9
_LAST_MOMENT = datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()


def json_response(payload: Any) -> web.Response:
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def positive_int(request: web.Request, name: str, default: int, maximum: int = MAX_PAGE) -> int:
    value = request.query.get(name)
    if value is None:
        return default
    # int() would also take "1_0" and digits of other scripts.
    if not (value.isascii() and value.isdigit()):
        raise BadRequest(f"{name} must be a whole number", param=name)
    number = int(value)
    if not 1 <= number <= maximum:
        raise BadRequest(f"{name} must be from 1 to {maximum}", param=name)
    return number


def moment(request: web.Request, name: str, *, end: bool) -> float | None:
    """A time bound from the query: ISO 8601, or a date (meaning the whole day)."""
    value = request.query.get(name)
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        timestamp = parsed.timestamp()
        # Stored times are written back as UTC dates, which must exist too.
        datetime.fromtimestamp(timestamp, tz=UTC)
    except (ValueError, OverflowError, OSError):
        raise BadRequest(
            f"{name} must be a date (2026-01-31) or an ISO 8601 time "
            "(2026-01-31T12:00:00Z) within the years 1 to 9999",
            param=name,
        ) from None
    if end and not any(mark in text for mark in "T: "):
        # A date alone (2026-01-31, 20260131, 2026-W05-6) as an end means
        # up to the end of that day.
        timestamp = min(timestamp + 86400, _LAST_MOMENT)
    return timestamp


def parse_json(raw: bytes, *, empty: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request body that must be a JSON object; ``empty`` stands in for no body."""
    if not raw or raw.isspace():
        if empty is not None:
            return empty
        raise BadRequest("The request body is empty: send a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"The request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object")
    return body
