"""The ``/key/*`` management routes, with LiteLLM's paths and field names.

Every route needs the master key, except ``GET /key/info`` which a virtual
key may call about itself.  Every change is committed to the keystore (and
to its memory) before the route answers, so it holds on the next request.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from keystore import KeyFilter, KeyRecord
from keystore.records import to_iso
from policies import Context

from .errors import BadRequest, Forbidden, NotFound
from .guard import Routes
from .keyfields import (
    DURATION_UNITS,
    GENERATE_FIELDS,
    UPDATE_FIELDS,
    parse_duration,
    reject_unknown,
    validate_fields,
)
from .keys import MAX_PAGE_SIZE
from .params import json_response, parse_json, positive_int
from .state import AUTH, CONFIG, CONTEXT, KEYS, KEYSTORE, ROUTER

__all__ = ["add_routes", "caller", "require_master"]


async def caller(request: web.Request) -> Context:
    """Authenticate whoever calls an admin route (master or virtual key)."""
    ctx = Context("admin", request.headers)
    request[CONTEXT] = ctx
    await request.app[AUTH].check(ctx)
    return ctx


async def require_master(request: web.Request) -> None:
    if request.app[CONFIG].master_key is None:
        raise Forbidden(
            "No master key is configured: set general_settings.master_key "
            "to use the admin routes"
        )
    ctx = await caller(request)
    if not ctx.is_master:
        raise Forbidden(f"Only the master key may call {request.path}")


async def _body(request: web.Request, fields: set[str] | None = None) -> dict[str, Any]:
    """The JSON body (empty counts as {}); with ``fields``, nothing else allowed."""
    body = parse_json(await request.read(), empty={})
    if fields is not None:
        reject_unknown(body, fields)
    return body


def _created(raw: str, record: KeyRecord) -> dict[str, Any]:
    # The one answer that carries the raw key: it is never shown again.
    return {"key": raw} | record.public()


async def generate(request: web.Request) -> web.Response:
    await require_master(request)
    fields = validate_fields(await _body(request), GENERATE_FIELDS)
    raw, record = await request.app[KEYS].generate(fields)
    return json_response(_created(raw, record))


async def generate_service_account(request: web.Request) -> web.Response:
    await require_master(request)
    fields = validate_fields(await _body(request), GENERATE_FIELDS)
    raw, record = await request.app[KEYS].generate(fields, service_account=True)
    return json_response(_created(raw, record))


async def info(request: web.Request) -> web.Response:
    ctx = await caller(request)
    ref = request.query.get("key")
    record: KeyRecord | None
    if ref is None:
        if ctx.key is None:
            raise BadRequest("Name the key: /key/info?key=<key, hash or alias>",
                             param="key")
        record = ctx.key
    elif ctx.is_master:
        record = await request.app[KEYS].lookup(ref)
    else:
        # The same answer whether or not the named key exists: a virtual key
        # must not learn which aliases or digests are in use.
        try:
            named = await request.app[KEYS].lookup(ref)
        except NotFound:
            named = None
        if ctx.key is None or named is None or ctx.key.token != named.token:
            raise Forbidden("A virtual key may only read its own /key/info")
        record = named
    return json_response({"key": record.token, "info": await _with_usage(request, record)})


async def _with_usage(request: web.Request, record: KeyRecord) -> dict[str, Any]:
    """The key as stored, with spend still queued and its current limit usage."""
    keystore = request.app[KEYSTORE]
    # The cached record is the freshest: the caller's copy may predate a change.
    record = keystore.cached(record.token) or record
    spend, reset_at = await keystore.spend(record)
    public = record.public()
    public["spend"] = spend
    public["budget_reset_at"] = to_iso(reset_at)
    usage = await keystore.counters.usage(record)
    limits = {}
    for name, limit, used in (
        ("rpm_limit", record.rpm_limit, usage["requests_last_minute"]),
        ("tpm_limit", record.tpm_limit, usage["tokens_last_minute"]),
        ("max_parallel_requests", record.max_parallel_requests,
         usage["requests_in_flight"]),
    ):
        remaining = None if limit is None else max(0, limit - used)
        limits[name] = {"limit": limit, "used": used, "remaining": remaining}
    public["limit_usage"] = limits
    public["budget_remaining"] = (
        None if record.max_budget is None else max(0.0, record.max_budget - spend)
    )
    return public


async def list_keys(request: web.Request) -> web.Response:
    await require_master(request)
    query = request.query
    account_type = query.get("account_type")
    if account_type is not None and account_type not in ("user", "service_account"):
        raise BadRequest("account_type must be user or service_account",
                         param="account_type")
    where = KeyFilter(
        account_type=account_type,
        key_alias=query.get("key_alias"),
        user_id=query.get("user_id"),
        team_id=query.get("team_id"),
    )
    page = await request.app[KEYS].list(
        where, positive_int(request, "page", 1), positive_int(request, "size", 10)
    )
    full = query.get("return_full_object", "false").lower() == "true"
    return json_response({
        "keys": [record.public() if full else record.token for record in page.keys],
        "total_count": page.total_count,
        "current_page": page.current_page,
        "total_pages": page.total_pages,
    })


async def update(request: web.Request) -> web.Response:
    await require_master(request)
    body = await _body(request)
    if "key" not in body:
        raise BadRequest("Name the key to update: {\"key\": <key, hash or alias>}",
                         param="key")
    ref = body.pop("key")
    fields = validate_fields(body, UPDATE_FIELDS - {"key"})
    record = await request.app[KEYS].update(ref, fields)
    return json_response(record.public())


async def delete(request: web.Request) -> web.Response:
    await require_master(request)
    body = await _body(request, {"keys", "key_aliases"})
    refs: list[Any] = []
    for field in ("keys", "key_aliases"):
        value = body.get(field) or []
        if not isinstance(value, list):
            raise BadRequest(f"{field} must be a list", param=field)
        refs += [(ref, field) for ref in value]
    if not refs:
        raise BadRequest("Name the keys to delete in keys or key_aliases", param="keys")
    tokens = await request.app[KEYS].delete(refs)
    return json_response({"deleted_keys": tokens})


async def _set_blocked(request: web.Request, blocked: bool) -> web.Response:
    await require_master(request)
    body = await _body(request, {"key"})
    record = await request.app[KEYS].update(body.get("key"), {"blocked": blocked})
    return json_response(record.public())


async def block(request: web.Request) -> web.Response:
    return await _set_blocked(request, True)


async def unblock(request: web.Request) -> web.Response:
    return await _set_blocked(request, False)


async def regenerate(request: web.Request) -> web.Response:
    await require_master(request)
    body = await _body(request, {"key", "grace_period"})
    grace = body.get("grace_period")
    seconds = None if grace is None else parse_duration(grace, "grace_period")
    raw, record = await request.app[KEYS].regenerate(body.get("key"), seconds)
    return json_response(_created(raw, record))


async def settings(request: web.Request) -> web.Response:
    """What an admin client needs to offer valid choices (the admin page)."""
    await require_master(request)
    config = request.app[CONFIG]
    return json_response({
        "models": list(request.app[ROUTER].groups),
        "enforced_params": list(config.enforced_params),
        "service_account_settings": {
            "enforced_params": list(config.service_account_params),
            "param_headers": config.param_headers,
        },
        "durations": {
            "units": DURATION_UNITS,
            "examples": ["30s", "15m", "12h", "30d"],
        },
        "max_page_size": MAX_PAGE_SIZE,
    })


def add_routes(routes: Routes) -> None:
    routes.add_get("/admin/settings", settings)
    routes.add_post("/key/generate", generate)
    routes.add_post("/key/service-account/generate", generate_service_account)
    routes.add_get("/key/info", info)
    routes.add_get("/key/list", list_keys)
    routes.add_post("/key/update", update)
    routes.add_post("/key/delete", delete)
    routes.add_post("/key/block", block)
    routes.add_post("/key/unblock", unblock)
    routes.add_post("/key/regenerate", regenerate)
