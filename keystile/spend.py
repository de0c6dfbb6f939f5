"""The ``/spend/*`` routes: the usage ledger for the operator (master key).

Both answer from SQLite after writing whatever is still queued, so a
request that has ended is always in the answer.
"""

from __future__ import annotations

from aiohttp import web

from keystore import UsageFilter, hash_key, looks_like_hash

from .admin import require_master
from .errors import BadRequest
from .guard import Routes
from .params import json_response, moment, positive_int
from .state import KEYS, KEYSTORE

__all__ = ["add_routes"]

MAX_PAGE_SIZE = 1000
GROUPS = ("key", "user", "model")


async def _filter(request: web.Request) -> UsageFilter:
    query = request.query
    key_hash = None
    ref = query.get("key")
    if ref:
        ref = ref.strip()
        if ref.startswith("sk-"):
            key_hash = hash_key(ref)
        elif looks_like_hash(ref):
            key_hash = ref
        else:
            # An alias: the ledger rows of the key it names now.
            key_hash = (await request.app[KEYS].lookup(ref)).token
    return UsageFilter(
        key_hash=key_hash,
        key_alias=query.get("key_alias") or None,
        end_user=query.get("end_user") or query.get("user") or None,
        model_group=query.get("model") or None,
        start=moment(request, "start_date", end=False),
        end=moment(request, "end_date", end=True),
    )


async def logs(request: web.Request) -> web.Response:
    await require_master(request)
    where = await _filter(request)
    page = positive_int(request, "page", 1)
    size = positive_int(request, "page_size", 100, MAX_PAGE_SIZE)
    keystore = request.app[KEYSTORE]
    await keystore.flush()
    rows, total = await keystore.usage_logs(where, (page - 1) * size, size)
    return json_response({
        "logs": rows,
        "total_count": total,
        "current_page": page,
        "total_pages": max(1, -(-total // size)),
    })


async def report(request: web.Request) -> web.Response:
    await require_master(request)
    group_by = request.query.get("group_by", "key")
    if group_by not in GROUPS:
        raise BadRequest("group_by must be key, user or model", param="group_by")
    where = await _filter(request)
    keystore = request.app[KEYSTORE]
    await keystore.flush()
    rows = await keystore.usage_report(group_by, where)
    return json_response({"group_by": group_by, "report": rows})


def add_routes(routes: Routes) -> None:
    routes.add_get("/spend/logs", logs)
    routes.add_get("/spend/report", report)
