"""How every route is served: failures rendered in the OpenAI error envelope,
and the headers every answer carries.

Each handler is registered wrapped by ``guarded`` rather than behind an
aiohttp middleware: the middleware machinery adds layers to every request,
and on the proxy's hot path they cost measurably.  The last route (see
``Routes.add_fallback``) takes whatever no other route does, so that a
wrong path or method gets the envelope too.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from keystore import KeystoreBusy

from .errors import (
    BadRequest,
    ProxyError,
    Unavailable,
    error_body,
    error_response,
    internal_error_response,
)
from .tracing import add_response_headers
from .usage import CLIENT_GONE

__all__ = ["MAX_BODY", "Handler", "Routes", "guarded"]

logger = logging.getLogger(__name__)

# Long chats and inline images make multi-MiB bodies ordinary traffic; the
# cap only stops a client from filling the memory of a small machine.
MAX_BODY = 64 * 1024 * 1024

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def guarded(handler: Handler) -> Handler:
    """``handler`` with every failure rendered and the common headers added.

    A stream's headers leave when it is prepared, inside the handler, so
    the code that prepares one adds them itself.
    """

    async def guard(request: web.Request) -> web.StreamResponse:
        try:
            response = await handler(request)
        except ProxyError as error:
            response = error_response(error)
        except KeystoreBusy as exc:
            response = error_response(Unavailable(f"The database cannot be written right now: {exc}"))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _http_error(request, exc)
        except RequestPayloadError as exc:
            # A body that cannot be read as sent, such as broken gzip.
            response = error_response(BadRequest(f"The request body could not be read: {exc}"))
        except ConnectionResetError:
            # The client hung up while its answer was being sent.  aiohttp's own
            # attempt to send this one fails quietly, and the access log shows
            # the hang-up with the same status the usage ledger records.
            return web.Response(status=CLIENT_GONE)
        except Exception:
            logger.exception("unexpected error on %s %s", request.method, request.path)
            response = internal_error_response()
        if not response.prepared:
            add_response_headers(request, response)
            if response.status >= 400 and request.content.exception() is not None:
                # The body could not be read to its end, so the connection
                # cannot carry another request: say so rather than drop it.
                response.force_close()
        return response

    return guard


def _http_error(request: web.Request, exc: web.HTTPException) -> web.Response:
    if exc.status == 413:
        message = f"The request body is larger than {MAX_BODY // (1024 * 1024)} MiB"
    elif exc.status == 404:
        # As sent: decoded, /chat%2Fcompletions would read as a real route.
        message = f"No route for {request.method} {request.raw_path}"
    elif exc.status == 405:
        message = f"{request.method} is not allowed on {request.raw_path}"
    else:
        message = exc.reason
    return web.Response(
        status=exc.status,
        body=error_body(message, _HTTP_TYPES.get(exc.status, "invalid_request_error"),
                        None, exc.status),
        content_type="application/json",
        headers={"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None,
    )


async def _unrouted(request: web.Request) -> web.StreamResponse:
    """The last route: a path no other route takes, or a method it does not."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        # Matched the way the router matches, so that a path it did not
        # take (such as one with an encoded slash) is a 404 here too.
        _, methods = await resource.resolve(request)
        if "*" not in methods:
            allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, sorted(allowed))
    raise web.HTTPNotFound()


class Routes:
    """Adds routes to ``router`` with their handlers wrapped by ``guarded``."""

    def __init__(self, router: web.UrlDispatcher) -> None:
        self._router = router

    def add_fallback(self) -> None:
        """The last route: call after every other one is added."""
        # Any character after the slash, a decoded newline included.
        self._router.add_route("*", r"/{tail:[\s\S]*}", guarded(_unrouted))

    def add_get(self, path: str, handler: Handler) -> None:
        self._router.add_get(path, guarded(handler))

    def add_post(self, path: str, handler: Handler) -> None:
        self._router.add_post(path, guarded(handler))


_HTTP_TYPES = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
