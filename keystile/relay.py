"""Forwarding a request to its deployment and relaying the answer.

One client session (one pool of keep-alive connections) serves every
upstream.  This module is the only place that catches aiohttp client
errors; it turns them into the proxy's upstream errors.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from policies import Context

from .config import Deployment
from .errors import ProxyError, UpstreamFailed, UpstreamTimedOut, error_body
from .mock import mock_response
from .sse import EventSplitter
from .usage import METER

__all__ = ["Relay"]

logger = logging.getLogger(__name__)

# Client headers that must not reach the upstream: the client's own
# credentials (replaced by the deployment's), hop-by-hop headers, and
# encodings we would have to undo to stream byte for byte.
_DROPPED = frozenset({
    "authorization", "api-key", "x-api-key", "host", "content-length",
    "connection", "keep-alive", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "cookie",
    "accept-encoding",
})
# Upstream headers worth passing back; the rest describe the upstream's
# connection, not the answer.
_KEPT = ("Content-Type", "Retry-After")
_STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
# Upstream error bodies are read whole to pass them on; a sane one is tiny.
_MAX_ERROR_BODY = 1 << 20


class Relay:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    async def forward(self, request: web.Request, ctx: Context) -> web.StreamResponse:
        deployment: Deployment = ctx.deployment
        assert ctx.body is not None
        if deployment.provider == "mock":
            body = _forwarded_body(ctx, deployment)
            return await mock_response(
                request, ctx.endpoint, body, ctx.raw_body, deployment
            )

        url = f"{deployment.api_base}/{ctx.endpoint}"
        headers = {
            name: value for name, value in request.headers.items()
            if name.lower() not in _DROPPED
        }
        if deployment.api_key:
            headers["Authorization"] = f"Bearer {deployment.api_key}"
        if ctx.body_changes or ctx.body.get("model") != deployment.upstream_model:
            payload = orjson.dumps(_forwarded_body(ctx, deployment))
        else:
            # Nothing to rewrite: the client's bytes go on untouched.
            payload = ctx.raw_body
        timeout = aiohttp.ClientTimeout(total=deployment.timeout)

        try:
            upstream = await self.session.post(
                url, data=payload, headers=headers, timeout=timeout
            )
        except asyncio.TimeoutError as exc:
            raise UpstreamTimedOut(
                f"The upstream for {ctx.model_group!r} did not answer within "
                f"{deployment.timeout:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamFailed(
                f"The upstream for {ctx.model_group!r} could not be reached: "
                f"{type(exc).__name__}"
            ) from exc

        try:
            if upstream.status >= 400:
                return await _relay_error(upstream, ctx)
            if upstream.content_type == "text/event-stream":
                return await _relay_stream(request, upstream, ctx)
            return await _relay_whole(upstream, ctx)
        finally:
            upstream.release()


def _forwarded_body(ctx: Context, deployment: Deployment) -> dict[str, Any]:
    assert ctx.body is not None
    body = dict(ctx.body)
    body["model"] = deployment.upstream_model
    for path, value in ctx.body_changes.items():
        _set_path(body, path, value)
    return body


def _set_path(body: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split(".")
    target = body
    for name in parents:
        child = target.get(name)
        # Copy on the way down: the client's parsed body stays as it came.
        child = dict(child) if isinstance(child, dict) else {}
        target[name] = child
        target = child
    target[last] = value


def _kept_headers(upstream: aiohttp.ClientResponse) -> dict[str, str]:
    return {name: upstream.headers[name] for name in _KEPT if name in upstream.headers}


async def _read(upstream: aiohttp.ClientResponse, ctx: Context, limit: int | None) -> bytes:
    try:
        if limit is None:
            return await upstream.read()
        return await upstream.content.read(limit)
    except asyncio.TimeoutError as exc:
        raise UpstreamTimedOut(
            f"The upstream for {ctx.model_group!r} stopped answering"
        ) from exc
    except aiohttp.ClientError as exc:
        raise UpstreamFailed(
            f"The upstream for {ctx.model_group!r} broke off its answer: "
            f"{type(exc).__name__}"
        ) from exc


async def _relay_whole(upstream: aiohttp.ClientResponse, ctx: Context) -> web.Response:
    body = await _read(upstream, ctx, None)
    return web.Response(status=upstream.status, body=body, headers=_kept_headers(upstream))


async def _relay_error(upstream: aiohttp.ClientResponse, ctx: Context) -> web.Response:
    body = await _read(upstream, ctx, _MAX_ERROR_BODY)
    headers = {"Retry-After": upstream.headers["Retry-After"]} if (
        "Retry-After" in upstream.headers) else {}
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        # Already an OpenAI error: its own type and code (such as
        # context_length_exceeded) are what the client wants to see.
        return web.Response(status=upstream.status, body=body,
                            content_type="application/json", headers=headers)
    text = body.decode("utf-8", "replace").strip()[:500] or upstream.reason or "no body"
    message = f"The upstream for {ctx.model_group!r} answered {upstream.status}: {text}"
    return web.Response(
        status=upstream.status,
        body=error_body(message, "upstream_error", None, upstream.status),
        content_type="application/json",
        headers=headers,
    )


async def _relay_stream(
    request: web.Request, upstream: aiohttp.ClientResponse, ctx: Context
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, headers=_STREAM_HEADERS)
    await response.prepare(request)
    splitter = EventSplitter()
    meter = request.get(METER)
    try:
        # iter_any hands over whatever arrived, as soon as it arrived; every
        # event it completes goes out in the same write.
        async for chunk in upstream.content.iter_any():
            events = splitter.feed(chunk)
            if events and meter is not None:
                events = meter.events(events)
            if events:
                await response.write(b"".join(events))
        rest = splitter.rest()
        if rest:
            await response.write(rest)
    except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
        # Headers are gone: the only honest thing left is one last event
        # that says the stream broke, then closing without [DONE].
        error: ProxyError = (
            UpstreamTimedOut(f"The upstream for {ctx.model_group!r} stopped streaming")
            if isinstance(exc, asyncio.TimeoutError)
            else UpstreamFailed(
                f"The upstream for {ctx.model_group!r} broke off the stream: "
                f"{type(exc).__name__}"
            )
        )
        logger.warning("stream from %s failed: %s", ctx.deployment.id, error.message)
        await response.write(
            b"data: " + error_body(error.message, error.type, None, error.status) + b"\n\n"
        )
    await response.write_eof()
    return response
