"""The aiohttp application: its routes, shared objects and the proxy handler."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import aiohttp
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from keystore import open_keystore
from policies import Context, Policy, build_chain
from policies.auth import Authenticate

from . import admin, explain, spend, ui
from .config import Config
from .errors import BadRequest, Forbidden, ProxyError, error_body
from .guard import MAX_BODY, Handler, Routes
from .keys import KeyService
from .params import parse_json
from .relay import Relay
from .router import Router
from .state import AUTH, CHAIN, CONFIG, CONTEXT, KEYS, KEYSTORE, RELAY, ROUTER
from .usage import CLIENT_GONE, METER, Meter, record

__all__ = ["create_app", "run_chain"]

logger = logging.getLogger(__name__)


READINESS_TIMEOUT = 1.0
ENDPOINTS = ("chat/completions", "completions", "embeddings")

async def run_chain(chain: list[Policy], ctx: Context) -> None:
    for policy in chain:
        await policy.check(ctx)


def _proxy_handler(endpoint: str) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        app = request.app
        meter = Meter()
        ctx = Context(endpoint, request.headers)
        request[CONTEXT] = ctx
        status = 500
        try:
            # The caller before the body: a bad key is a 401 whatever it
            # sent, and a known key's unreadable request is in the ledger
            # like any other refusal.  (The chain's own authentication then
            # finds the caller already known.)
            await app[AUTH].check(ctx)
            ctx.raw_body = await _read_body(request)
            ctx.body = parse_json(ctx.raw_body)
            await run_chain(app[CHAIN], ctx)
            meter.prepare(ctx)
            request[METER] = meter
            response = await app[RELAY].forward(request, ctx)
            status = CLIENT_GONE if meter.client_gone else response.status
            if isinstance(response, web.Response) and isinstance(response.body, bytes) and (
                status < 400
            ):
                meter.body(response.body)
            return response
        except (ProxyError, web.HTTPException) as error:
            status = error.status
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            status = CLIENT_GONE
            raise
        finally:
            # Runs on every outcome, a client hanging up included: the
            # parallel slot is given back and the request is in the ledger.
            keystore = app[KEYSTORE]
            if ctx.admission is not None:
                await keystore.counters.release(ctx.admission)
            if ctx.key is not None or ctx.is_master:
                try:
                    await record(keystore, ctx, meter, status)
                except Exception:
                    # The answer is already decided; a bug in accounting must
                    # not turn it into an error, only be seen in the log.
                    logger.exception("could not record usage of %s", request.path)

    return handle


async def _read_body(request: web.Request) -> bytes:
    try:
        return await request.read()
    except RequestPayloadError as exc:
        # A body that cannot be read as sent, such as broken gzip.
        raise BadRequest(f"The request body could not be read: {exc}") from exc


async def list_models(request: web.Request) -> web.Response:
    ctx = Context("models", request.headers)
    request[CONTEXT] = ctx
    await request.app[AUTH].check(ctx)
    names = request.app[ROUTER].visible(ctx.key)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": "keystile"}
            for name in names]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}),
                        content_type="application/json")


async def explain_route(request: web.Request) -> web.Response:
    """A dry run of the chain for the request in the body; never forwards it."""
    app = request.app
    endpoint, ref, body = explain.split_body(parse_json(await request.read()))
    subject = explain.Subject(request.headers)
    if ref is not None:
        # Only the master key may ask about someone else's key.
        caller = Context("explain", request.headers)
        request[CONTEXT] = caller
        await app[AUTH].check(caller)
        if not caller.is_master:
            raise Forbidden("Only the master key may explain another key", param="key")
        subject = await explain.name_key(app[KEYS], ref, request.headers)
    ctx = explain.context(endpoint, body, subject)
    if ref is None:
        request[CONTEXT] = ctx
    answer = await explain.explain(app[CHAIN], app[ROUTER], ctx, subject.described)
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


async def liveliness(request: web.Request) -> web.Response:
    return web.Response(body=b'"I\'m alive!"', content_type="application/json")


async def readiness(request: web.Request) -> web.Response:
    # The check runs beside the request, not under a cancel: a locked file
    # would otherwise hold the answer while aiosqlite cleans up.  A slow
    # check finishes on its own; its answer is simply no longer awaited.
    check = asyncio.ensure_future(request.app[KEYSTORE].ping())
    check.add_done_callback(_consume)
    done, _ = await asyncio.wait({check}, timeout=READINESS_TIMEOUT)
    problem = None
    if not done:
        problem = f"no answer within {READINESS_TIMEOUT:g} s"
    elif check.exception() is not None:
        problem = str(check.exception())
    if problem is not None:
        logger.warning("readiness check failed: %s", problem)
        return web.Response(
            status=503,
            body=error_body(f"The keystore is not available: {problem}",
                            "service_unavailable", None, 503),
            content_type="application/json",
        )
    body = {"status": "healthy", "db": "connected"}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _consume(task: asyncio.Future[None]) -> None:
    # Retrieve a late failure so that asyncio does not report it as lost.
    if not task.cancelled():
        task.exception()


def create_app(config: Config, *, reload_interval: float = 1.0) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app[CONFIG] = config
    router = Router(config.deployments, config.router_settings)
    app[ROUTER] = router

    async def resources(app: web.Application) -> AsyncIterator[None]:
        keystore = await open_keystore(config.database_path)
        keystore.start_watching(reload_interval)
        keystore.start_writing(config.batch_write_interval)
        # One pool for every upstream; connections are kept alive between
        # requests, which is most of what a proxy can save per call.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        # No Accept-Encoding of our own: streams must arrive as plain bytes
        # so they can be relayed as they come.  No cookie jar: the session is
        # shared by every key, so a kept cookie would pass between tenants.
        session = aiohttp.ClientSession(
            connector=connector, skip_auto_headers=("User-Agent", "Accept-Encoding"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        app[KEYSTORE] = keystore
        app[KEYS] = KeyService(keystore)
        chain = build_chain(config, keystore, router)
        assert isinstance(chain[0], Authenticate), "the chain starts with authentication"
        app[CHAIN] = chain
        app[AUTH] = chain[0]
        app[RELAY] = Relay(session, router)
        try:
            yield
        finally:
            await session.close()
            await keystore.close()

    app.cleanup_ctx.append(resources)
    routes = Routes(app.router)
    for endpoint in ENDPOINTS:
        handler = _proxy_handler(endpoint)
        routes.add_post(f"/{endpoint}", handler)
        routes.add_post(f"/v1/{endpoint}", handler)
    for path in ("/models", "/v1/models"):
        routes.add_get(path, list_models)
    routes.add_post("/route/explain", explain_route)
    routes.add_get("/health/liveliness", liveliness)
    routes.add_get("/health/readiness", readiness)
    admin.add_routes(routes)
    spend.add_routes(routes)
    ui.add_routes(routes)
    routes.add_fallback()
    return app
