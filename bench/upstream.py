"""Fake OpenAI upstream for the benchmark: fixed answers, no artificial delay.

POST /v1/chat/completions -> a small chat.completion JSON with `usage`, or, with
"stream": true, 20 SSE `chat.completion.chunk` events (+ a usage chunk when
stream_options.include_usage is set) and `data: [DONE]`.  GET /v1/models lists
the one model.  Usage: python bench/upstream.py --port P [--host 127.0.0.1]
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import orjson
from aiohttp import web

STREAM_CHUNKS = 20
USAGE = {"prompt_tokens": 9, "completion_tokens": STREAM_CHUNKS, "total_tokens": 9 + STREAM_CHUNKS}


def _chunk(model: str, created: int, delta: dict[str, Any], finish: str | None) -> bytes:
    body = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return b"data: " + orjson.dumps(body) + b"\n\n"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    try:
        req = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return web.json_response({"error": {"message": "invalid JSON"}}, status=400)
    model = str(req.get("model", "gpt-3.5-turbo"))
    created = int(time.time())
    if not req.get("stream"):
        body = {"id": "chatcmpl-bench", "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "Hello from the fake upstream."}}],
                "usage": USAGE}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    try:
        await resp.prepare(request)
        for i in range(STREAM_CHUNKS):
            delta = {"role": "assistant", "content": "tok0 "} if i == 0 else {"content": f"tok{i} "}
            # Each write goes straight to the transport, so every event leaves as its own chunk.
            await resp.write(_chunk(model, created, delta, "stop" if i == STREAM_CHUNKS - 1 else None))
        if (req.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": created,
                     "model": model, "choices": [], "usage": USAGE}
            await resp.write(b"data: " + orjson.dumps(usage) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the load generator hung up mid-stream (end of a run): not an upstream error
    return resp


async def models(_: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": "gpt-3.5-turbo", "object": "model", "created": 1700000000, "owned_by": "bench"}]})


async def unknown(request: web.Request) -> web.Response:
    # Report paths the proxy calls that we do not fake, so a mismatch is visible in the log.
    print(f"upstream: unhandled {request.method} {request.path}", file=sys.stderr, flush=True)
    return web.json_response({"error": {"message": f"not faked: {request.path}"}}, status=404)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_route("*", "/{tail:.*}", unknown)
    web.run_app(app, host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
