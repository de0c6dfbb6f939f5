"""One model group, two deployments, one of them failing half its requests.

  python bench/flaky.py                     # 200 requests, half of them streamed
  python bench/flaky.py --requests 1000 --concurrency 20 --status 500

Starts two fake upstreams and Keystile itself in this process, on 127.0.0.1
with ephemeral ports, sends the requests through the proxy and prints what
the client saw (statuses, streams that ended cleanly) next to what each
upstream saw.  With retries on (the default), the client should see no error.
Everything it starts is stopped before it exits.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from keystile.config import load_config  # noqa: E402
from keystile.server import start  # noqa: E402

MASTER_KEY = "sk-bench-flaky-master-key-000"


class Upstream:
    """Answers like OpenAI; with ``fail_status``, every second request fails."""

    def __init__(self, fail_status: int | None) -> None:
        self.fail_status = fail_status
        self.counts: collections.Counter[int] = collections.Counter()
        self.seen = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> Upstream:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}/v1"
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())
        self.seen += 1
        if self.fail_status is not None and self.seen % 2 == 0:
            self.counts[self.fail_status] += 1
            return web.json_response({"error": {"message": "overloaded"}},
                                     status=self.fail_status)
        self.counts[200] += 1
        model = body["model"]
        if not body.get("stream"):
            return web.json_response({
                "id": "chatcmpl-flaky", "object": "chat.completion", "created": 0,
                "model": model, "choices": [{"index": 0, "finish_reason": "stop",
                "message": {"role": "assistant", "content": "ok"}}],
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for word in ("Hello", " there", "!"):
            chunk = {"id": "chatcmpl-flaky", "object": "chat.completion.chunk",
                     "created": 0, "model": model,
                     "choices": [{"index": 0, "delta": {"content": word},
                                  "finish_reason": None}]}
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def one(session: aiohttp.ClientSession, url: str, stream: bool,
              seen: collections.Counter[str]) -> None:
    body: dict[str, Any] = {"model": "gpt-4o",
                            "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    async with session.post(url, json=body,
                            headers={"Authorization": f"Bearer {MASTER_KEY}"}) as response:
        raw = await response.read()
        kind = "stream" if stream else "json"
        seen[f"{kind} {response.status}"] += 1
        seen[f"retries={response.headers.get('x-keystile-retries')}"] += 1
        if stream and response.status == 200:
            clean = raw.count(b"data: [DONE]\n\n") == 1 and b'"error"' not in raw
            seen["stream ended cleanly" if clean else "stream BROKEN"] += 1


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--status", type=int, default=503, help="the failing status")
    parser.add_argument("--num-retries", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    healthy, flaky = await Upstream(None).start(), await Upstream(args.status).start()
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "model_list": [
                {"model_name": "gpt-4o", "model_info": {"id": "healthy"},
                 "litellm_params": {"model": "openai/gpt-4o", "api_base": healthy.url}},
                {"model_name": "gpt-4o", "model_info": {"id": "flaky"},
                 "litellm_params": {"model": "openai/gpt-4o", "api_base": flaky.url}},
            ],
            "general_settings": {"master_key": MASTER_KEY},
            # A large allowed_fails keeps the flaky one in rotation all along,
            # so that every one of its failures has to be hidden by a retry.
            "router_settings": {"num_retries": args.num_retries, "allowed_fails": 1000},
        }
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        runner, port = await start(load_config(path, str(Path(tmp) / "keys.db")),
                                   "127.0.0.1", 0)
        seen: collections.Counter[str] = collections.Counter()
        gate = asyncio.Semaphore(args.concurrency)
        url = f"http://127.0.0.1:{port}/chat/completions"
        started = time.monotonic()
        try:
            async with aiohttp.ClientSession() as session:
                async def bounded(i: int) -> None:
                    async with gate:
                        await one(session, url, i % 2 == 1, seen)
                await asyncio.gather(*(bounded(i) for i in range(args.requests)))
        finally:
            await runner.cleanup()
            await healthy.stop()
            await flaky.stop()
    elapsed = time.monotonic() - started

    print(f"{args.requests} requests in {elapsed:.2f} s, concurrency {args.concurrency}")
    print("client saw:   ", dict(sorted(seen.items())))
    print("healthy saw:  ", dict(healthy.counts))
    print("flaky saw:    ", dict(flaky.counts))
    errors = sum(n for name, n in seen.items()
                 if (name.split()[-1].isdigit() and name.split()[-1] != "200")
                 or name == "stream BROKEN")
    print("client errors:", errors)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
