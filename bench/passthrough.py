"""Bare aiohttp pass-through: the reference for what "a proxy" costs with no auth or policies.

Forwards POST /v1/chat/completions and /chat/completions to --upstream with one
shared ClientSession; JSON bodies are read whole, SSE is relayed chunk by chunk.
Usage: python bench/passthrough.py --port P --upstream http://127.0.0.1:U
"""
from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web


async def forward(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    url = request.app["upstream"] + "/v1/chat/completions"
    body = await request.read()
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as up:
        if not up.content_type.startswith("text/event-stream"):
            return web.Response(body=await up.read(), status=up.status, content_type=up.content_type)
        resp = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers["Content-Type"]})
        try:
            await resp.prepare(request)
            async for chunk in up.content.iter_any():  # relay as it arrives, no re-framing
                await resp.write(chunk)
            await resp.write_eof()
        except ConnectionResetError:
            pass  # client hung up mid-stream (end of a load run)
        return resp


async def on_startup(app: web.Application) -> None:
    app["session"] = aiohttp.ClientSession()


async def on_cleanup(app: web.Application) -> None:
    await app["session"].close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8001")
    args = ap.parse_args()
    app = web.Application()
    app["upstream"] = args.upstream.rstrip("/")
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/chat/completions", forward)
    app.router.add_post("/chat/completions", forward)
    # The same event loop Keystile picks (uvloop when installed), so the
    # comparison is between the two programs, not between two loops.
    try:
        import uvloop
    except ImportError:
        loop = None
    else:
        loop = uvloop.new_event_loop()
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None, loop=loop)


if __name__ == "__main__":
    main()
