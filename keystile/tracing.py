"""What every response says about how it was made: its request id and route.

``x-request-id`` is the client's own when it is a sane token, so that a
caller can follow one request through its logs and ours; anything else
(too long, or characters a log line should not hold) gets a new one.
"""

from __future__ import annotations

import itertools
import re
import secrets

from aiohttp import web

from .context import CONTEXT

__all__ = ["REQUEST_ID", "add_response_headers", "request_id"]

REQUEST_ID = "x-request-id"
MODEL_GROUP = "x-keystile-model-group"
DEPLOYMENT = "x-keystile-deployment-id"
RETRIES = "x-keystile-retries"
FALLBACK = "x-keystile-fallback"
_SANE = re.compile(r"[A-Za-z0-9._-]{1,128}")
# New ids are unique without a random draw per request: a random prefix
# per process, then a counter.
_PREFIX = secrets.token_hex(8)
_COUNTER = itertools.count(1)


def request_id(given: str | None) -> str:
    if given is not None and _SANE.fullmatch(given):
        return given
    return f"{_PREFIX}{next(_COUNTER):016x}"


def add_response_headers(request: web.Request, response: web.StreamResponse) -> None:
    """The headers every answer carries; call before its headers go out."""
    headers = response.headers
    headers[REQUEST_ID] = request_id(request.headers.get(REQUEST_ID))
    ctx = request.get(CONTEXT)
    if ctx is None:
        return
    if ctx.response_headers:
        # Where the key's limits stand, successful answers included.
        headers.update(ctx.response_headers)
    if ctx.route is None:
        return
    attempts = ctx.route
    headers[MODEL_GROUP] = attempts.groups[0]
    if ctx.deployment is not None:
        headers[DEPLOYMENT] = ctx.deployment.id
    headers[RETRIES] = str(attempts.retries)
    if attempts.fallback is not None:
        headers[FALLBACK] = attempts.fallback
