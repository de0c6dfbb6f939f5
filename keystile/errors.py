"""The proxy's own errors and their one JSON rendering.

Every error Keystile produces, from any layer, reaches the client in the
OpenAI envelope ``{"error": {"message", "type", "param", "code"}}`` with
``code`` set to the HTTP status as a string.  Clients written against
OpenAI (and LiteLLM's proxy) read ``type`` and ``param``, so those are part
of the contract, not decoration.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import orjson
from aiohttp import web

__all__ = [
    "BadRequest",
    "Conflict",
    "Forbidden",
    "NotFound",
    "ProxyError",
    "RateLimited",
    "Unauthenticated",
    "Unavailable",
    "UpstreamFailed",
    "UpstreamTimedOut",
    "error_body",
    "error_response",
    "internal_error_response",
]

logger = logging.getLogger(__name__)


class ProxyError(Exception):
    """Base of every error the proxy raises on purpose.

    ``status`` and ``type`` are class attributes so subclasses inherit the
    right rendering; an instance may override ``type`` where OpenAI or
    LiteLLM use a more specific one (``expired_key``, ``budget_exceeded``).
    """

    status = 500
    type = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if type is not None:
            self.type = type
        self.headers = dict(headers or {})


class BadRequest(ProxyError):
    status = 400
    type = "invalid_request_error"


class Unauthenticated(ProxyError):
    status = 401
    type = "authentication_error"


class Forbidden(ProxyError):
    status = 403
    type = "permission_error"


class NotFound(ProxyError):
    status = 404
    type = "not_found_error"


class Conflict(ProxyError):
    status = 409
    type = "conflict_error"


class RateLimited(ProxyError):
    status = 429
    type = "rate_limit_error"


class Unavailable(ProxyError):
    """The proxy itself cannot serve this now (its storage is locked)."""

    status = 503
    type = "service_unavailable"


class UpstreamFailed(ProxyError):
    """The upstream could not be reached or answered nonsense (502)."""

    status = 502
    type = "upstream_error"


class UpstreamTimedOut(ProxyError):
    status = 504
    type = "timeout_error"


def error_body(
    message: str, type: str, param: str | None, status: int
) -> bytes:
    # Key order is part of the contract: the documented service-account
    # rejection is compared byte for byte by users migrating from LiteLLM.
    error = {"message": message, "type": type, "param": param, "code": str(status)}
    try:
        return orjson.dumps({"error": error})
    except TypeError:
        # A message quoting undecodable client bytes: show them replaced
        # rather than fail to answer at all.
        error = {name: _replaced(value) for name, value in error.items()}
        return orjson.dumps({"error": error})


def _replaced(value: str | None) -> str | None:
    return None if value is None else value.encode("utf-8", "replace").decode("utf-8")


def error_response(error: ProxyError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error_body(error.message, error.type, error.param, error.status),
        content_type="application/json",
        headers=error.headers,
    )


def internal_error_response() -> web.Response:
    # The traceback is logged by the caller; the client only learns that
    # it was our fault, never the details.
    return web.Response(
        status=500,
        body=error_body("Internal error in the proxy", "internal_error", None, 500),
        content_type="application/json",
    )
