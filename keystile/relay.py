"""Forwarding a request to its deployments and relaying the answer.

One client session (one pool of keep-alive connections) serves every
upstream.  This module is the only place that catches aiohttp client
errors; it turns them into the proxy's upstream errors.

An attempt that fails in a way a retry can fix (see ``RETRYABLE``) before
any byte went to the client comes back as a ``_Failure``; ``forward`` then
asks the router for the next deployment.  Once a stream has started,
nothing is retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import math
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from policies import Context

from .config import Deployment
from .errors import ProxyError, UpstreamFailed, UpstreamTimedOut, error_body
from .mock import mock_response
from .router import Attempts, Router
from .sse import EventSplitter, EventTooLarge
from .tracing import add_response_headers
from .usage import METER, STREAM_USAGE_OPTION, Meter

__all__ = ["RETRYABLE", "Relay"]

logger = logging.getLogger(__name__)

# Statuses that another attempt may turn into an answer; any other 4xx is
# the request's own fault and goes straight back to the client.
RETRYABLE = frozenset({408, 429, 500, 502, 503, 504})
# Client headers that must not reach the upstream: the client's own
# credentials (replaced by the deployment's), hop-by-hop headers, and
# encodings we would have to undo to stream byte for byte.
_DROPPED = frozenset({
    "authorization", "api-key", "x-api-key", "host", "content-length",
    "connection", "keep-alive", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade", "cookie",
    "accept-encoding", "content-encoding", "content-type",
})
# Upstream headers worth passing back; the rest describe the upstream's
# connection, not the answer.
_KEPT = ("Content-Type",)
_STREAM_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
# Upstream error bodies are read whole to pass them on; a sane one is tiny.
_MAX_ERROR_BODY = 1 << 20
_LARGE_BODY = 1 << 20
# Answers that are not streams have only the session's whole-call timeout.
_NO_DEADLINE = contextlib.nullcontext()


_DONE = (b"data: [DONE]", b"data:[DONE]")
_ERROR_EVENT = (b'data: {"error"', b'data:{"error"')


@dataclass(slots=True)
class _Failure:
    """An attempt that a retry may fix, and what to answer if none does."""

    deployment: Deployment
    status: int | None = None
    error: ProxyError | None = None
    response: web.Response | None = None
    retry_after: float | None = None

    def answer(self) -> web.Response:
        if self.error is not None:
            raise self.error
        assert self.response is not None
        return self.response

    def describe(self) -> str:
        return self.error.message if self.error is not None else f"status {self.status}"


class Relay:
    def __init__(self, session: aiohttp.ClientSession, router: Router) -> None:
        self.session = session
        self.router = router
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        # One object per distinct value: deployments share a handful of them.
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds)
        return timeout

    async def forward(self, request: web.Request, ctx: Context) -> web.StreamResponse:
        """Answer from the first deployment that succeeds, retrying and falling back."""
        assert ctx.model is not None and ctx.model_group is not None
        attempts: Attempts | None = ctx.route
        if attempts is None:
            attempts = ctx.route = self.router.start(ctx.model_group, ctx.model, ctx.key)
        deployment: Deployment | None = ctx.deployment
        while deployment is not None:
            ctx.deployment = deployment
            outcome = await self._attempt(request, ctx, deployment)
            if not isinstance(outcome, _Failure):
                return outcome
            deployment, wait = self.router.next(
                attempts, deployment, outcome.status, outcome.retry_after
            )
            if deployment is None:
                logger.warning("%s failed (%s); no retry or fallback left after %d",
                               outcome.deployment.id, outcome.describe(), attempts.retries)
                return outcome.answer()
            logger.info("%s failed (%s); retrying on %s in %.3f s",
                        outcome.deployment.id, outcome.describe(), deployment.id, wait)
            if wait:
                await asyncio.sleep(wait)
        raise AssertionError("routing gave the relay no deployment")

    async def _attempt(
        self, request: web.Request, ctx: Context, deployment: Deployment
    ) -> web.StreamResponse | _Failure:
        """One call to one deployment: its answer, or a failure worth retrying."""
        assert ctx.body is not None
        if deployment.provider == "mock":
            body = _forwarded_body(ctx, deployment)
            return await mock_response(request, ctx.endpoint, body, ctx.raw_body, deployment)

        headers = {
            name: value for name, value in request.headers.items()
            if name.lower() not in _DROPPED
        }
        headers.update(deployment.auth_headers())
        # What goes upstream is always plain JSON, whatever encoding the
        # client's body arrived in (aiohttp has already decoded it).
        headers["Content-Type"] = "application/json"
        if ctx.body_changes or ctx.body.get("model") != deployment.upstream_model:
            payload = orjson.dumps(_forwarded_body(ctx, deployment))
        else:
            # Nothing to rewrite: the client's bytes go on untouched.
            payload = ctx.raw_body
        state = self.router.state
        state.begin(deployment)
        try:
            return await self._call(request, ctx, deployment, headers, payload)
        except (UpstreamFailed, UpstreamTimedOut) as error:
            return _Failure(deployment, error=error)
        finally:
            state.end(deployment)

    async def _call(
        self, request: web.Request, ctx: Context, deployment: Deployment,
        headers: dict[str, str], payload: bytes,
    ) -> web.StreamResponse | _Failure:
        assert ctx.body is not None
        group = ctx.model_group
        stream = ctx.body.get("stream") is True
        first_byte = deployment.stream_timeout if stream else deployment.timeout
        started = time.monotonic()
        upstream: aiohttp.ClientResponse | None = None
        try:
            # A stream must show its first bytes within stream_timeout,
            # while it can still be retried elsewhere; the whole call has
            # timeout.
            async with asyncio.timeout(first_byte) if stream else _NO_DEADLINE:
                # Never follow a redirect: it would send the prompt, and for
                # Azure the api-key header, to wherever the upstream says.
                upstream = await self.session.post(
                    deployment.url(ctx.endpoint), data=_body_payload(payload),
                    headers=headers, timeout=self._timeout(deployment.timeout),
                    allow_redirects=False,
                )
                first = b""
                if stream and upstream.status < 400 and _is_sse(upstream):
                    first = await upstream.content.readany()
        except (TimeoutError, aiohttp.ClientError) as exc:
            if upstream is not None:
                upstream.close()
            raise _upstream_error(
                exc, group, f"did not answer within {first_byte:g} s", "could not be reached"
            ) from exc
        except BaseException:
            # Headers came but the first bytes did not: this connection
            # is in an unknown state and must not go back to the pool.
            if upstream is not None:
                upstream.close()
            raise
        seconds = time.monotonic() - started

        try:
            if upstream.status >= 400:
                return await _relay_error(upstream, group, deployment)
            if upstream.status >= 300:
                raise UpstreamFailed(
                    f"The upstream for {group!r} answered {upstream.status}, a redirect; "
                    "Keystile does not follow redirects, so its api_base must be the final address"
                )
            if not stream:
                return await self._relay_whole(upstream, group, deployment, seconds,
                                               request.get(METER))
            if not _is_sse(upstream):
                raise UpstreamFailed(
                    f"The upstream for {group!r} answered a stream request with "
                    f"{upstream.content_type or 'no content type'}, not an event stream"
                )
            if not first:
                raise UpstreamFailed(
                    f"The upstream for {group!r} ended the stream before its first event"
                )
            self.router.state.answered(deployment, seconds)
            return await self._relay_stream(request, upstream, ctx, first)
        finally:
            upstream.release()

    async def _relay_whole(
        self, upstream: aiohttp.ClientResponse, group: str | None,
        deployment: Deployment, seconds: float, meter: Meter | None,
    ) -> web.Response:
        body = await _read(upstream, group, None)
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        if not isinstance(parsed, dict):
            raise UpstreamFailed(
                f"The upstream for {group!r} answered {upstream.status} "
                "with a body that is not a JSON object"
            )
        self.router.state.answered(deployment, seconds)
        usage = parsed.get("usage")
        if deployment.tpm is not None and isinstance(usage, dict):
            tokens = usage.get("total_tokens")
            if isinstance(tokens, int):
                self.router.state.add_tokens(deployment, tokens)
        if meter is not None:
            meter.answer(parsed)
        return web.Response(status=upstream.status, body=body, headers=_kept_headers(upstream))

    async def _relay_stream(
        self, request: web.Request, upstream: aiohttp.ClientResponse, ctx: Context,
        first: bytes,
    ) -> web.StreamResponse:
        """Relay event by event; the first bytes have arrived, so nothing is retried."""
        response = web.StreamResponse(status=upstream.status, headers=_STREAM_HEADERS)
        add_response_headers(request, response)
        await response.prepare(request)
        splitter = EventSplitter()
        meter = request.get(METER)
        try:
            await self._relay_events(upstream, ctx, response, splitter, meter, first)
        except ConnectionResetError:
            # The client hung up: nobody is left to tell, and the ledger
            # records the request as abandoned.
            if meter is not None:
                meter.client_gone = True
        return response

    async def _relay_events(
        self, upstream: aiohttp.ClientResponse, ctx: Context,
        response: web.StreamResponse, splitter: EventSplitter, meter: Meter | None,
        chunk: bytes,
    ) -> None:
        group = ctx.model_group
        last: bytes | None = None  # the upstream's [DONE] or its own error event
        error: ProxyError | None = None
        while chunk:
            try:
                events = splitter.feed(chunk)
            except EventTooLarge as exc:
                error = UpstreamFailed(f"The upstream for {group!r} broke the stream: {exc}")
                break
            for i, event in enumerate(events):
                if event.startswith(_DONE) or event.startswith(_ERROR_EVENT):
                    # Whatever the upstream sends after its end is not ours
                    # to pass on: a client must see exactly one ending.
                    del events[i + 1:]
                    last = event
                    break
            if events and meter is not None:
                events = meter.events(events)
            if events:
                await response.write(b"".join(events))
            if last is not None:
                break
            try:
                chunk = await upstream.content.readany()
            except (TimeoutError, aiohttp.ClientError) as exc:
                error = _upstream_error(exc, group, "stopped answering", "broke off its answer")
                break

        if error is None and last is None:
            rest = splitter.rest()
            if rest.strip():
                # The upstream closed without the blank line after its last
                # event; end it so that the client parses it.
                rest = rest.rstrip(b"\r\n") + b"\n\n"
                if meter is not None:
                    meter.events([rest])
                await response.write(rest)
                if rest.startswith(_DONE) or rest.startswith(_ERROR_EVENT):
                    last = rest
            if last is None:
                await response.write(b"data: [DONE]\n\n")
        if error is not None:
            # Headers are gone: the only honest thing left is one last event
            # that says the stream broke, then closing without [DONE].
            assert ctx.deployment is not None
            logger.warning("stream from %s failed: %s", ctx.deployment.id, error.message)
            self.router.broke(ctx.deployment)
            await response.write(
                b"data: " + error_body(error.message, error.type, None, error.status)
                + b"\n\n"
            )
        await response.write_eof()


def _is_sse(upstream: aiohttp.ClientResponse) -> bool:
    return upstream.content_type == "text/event-stream"


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (seconds or an HTTP date), or None."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _upstream_error(
    exc: TimeoutError | aiohttp.ClientError, group: str | None, timed_out: str, failed: str
) -> ProxyError:
    """The one translation of aiohttp's errors into the proxy's."""
    # aiohttp's own timeouts are TimeoutErrors too, and some also ClientErrors.
    error: ProxyError
    if isinstance(exc, TimeoutError):
        error = UpstreamTimedOut(f"The upstream for {group!r} {timed_out}")
    else:
        error = UpstreamFailed(f"The upstream for {group!r} {failed}: {type(exc).__name__}")
    error.__cause__ = exc
    return error


def _forwarded_body(ctx: Context, deployment: Deployment) -> dict[str, Any]:
    assert ctx.body is not None
    body = dict(ctx.body)
    body["model"] = deployment.upstream_model
    for path, value in ctx.body_changes.items():
        if path == STREAM_USAGE_OPTION and not deployment.stream_usage:
            # A retry or fallback may reach a server that rejects the option.
            continue
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


async def _read(upstream: aiohttp.ClientResponse, group: str | None, limit: int | None) -> bytes:
    """The whole body (``None``) or at most ``limit`` bytes of it."""
    try:
        if limit is None:
            return await upstream.read()
        return await upstream.content.read(limit)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _upstream_error(exc, group, "stopped answering", "broke off its answer") from exc


async def _relay_error(
    upstream: aiohttp.ClientResponse, group: str | None, deployment: Deployment
) -> web.Response | _Failure:
    body = await _read(upstream, group, _MAX_ERROR_BODY)
    # Passed on as whole seconds, and only when it makes sense: some servers
    # send negative, fractional or nonsense values that clients choke on.
    seconds = _retry_after(upstream.headers.get("Retry-After"))
    headers: dict[str, str] = {}
    if seconds is not None and math.isfinite(seconds):
        headers["Retry-After"] = str(math.ceil(seconds))
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        # Already an OpenAI error: its own type and code (such as
        # context_length_exceeded) are what the client wants to see.
        response = web.Response(status=upstream.status, body=body,
                                content_type="application/json", headers=headers)
    else:
        text = body.decode("utf-8", "replace").strip()[:500] or upstream.reason or "no body"
        message = f"The upstream for {group!r} answered {upstream.status}: {text}"
        response = web.Response(
            status=upstream.status,
            body=error_body(message, "upstream_error", None, upstream.status),
            content_type="application/json",
            headers=headers,
        )
    if upstream.status in RETRYABLE:
        return _Failure(deployment, status=upstream.status, response=response,
                        retry_after=seconds)
    return response


def _body_payload(payload: bytes) -> aiohttp.BytesPayload | io.BytesIO:
    # aiohttp writes a file-like body in pieces instead of holding the
    # event loop for one large write; a fresh one per attempt, since a
    # retry must send the body again from its start.
    if len(payload) > _LARGE_BODY:
        return io.BytesIO(payload)
    # Ready-made, so that aiohttp skips looking up a payload type per call.
    return aiohttp.BytesPayload(payload)
