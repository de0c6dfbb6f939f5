"""A scriptable fake OpenAI-compatible upstream, served over real HTTP.

Tests tell it how to answer (status, body, delay, stream chunks, a failure
halfway) and read back every request it received, exactly as it arrived.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)


@dataclass
class Script:
    """How the fake answers the next requests; defaults mimic OpenAI."""

    status: int = 200
    body: bytes | None = None  # None: a chat.completion built from the request
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before the headers
    chunks: list[bytes] | None = None  # raw SSE bytes for streams, sent as given
    chunk_delay: float = 0.0
    break_after: int | None = None  # drop the connection after this many chunks
    stall_after: int | None = None  # after this many chunks, send nothing more
    stall: asyncio.Event | None = None  # wait for this before answering
    hold_after: int | None = None  # after this many chunks, wait for `release`
    release: asyncio.Event | None = None
    split: int | None = None  # re-cut the stream's bytes into pieces of this size


def completion(model: str, content: str = "Hello there, how may I assist you today?",
               prompt_tokens: int = 9, completion_tokens: int = 12) -> dict[str, Any]:
    return {
        "id": "chatcmpl-upstream-0001",
        "object": "chat.completion",
        "created": 1677652288,
        "model": model,
        "system_fingerprint": "fp_44709d6fcb",
        "choices": [{
            "index": 0,
            "finish_reason": "stop",
            "message": {"role": "assistant", "content": content,
                        "tool_calls": None, "function_call": None},
        }],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens,
                  "completion_tokens_details": None},
        "service_tier": None,
    }


def sse_chunks(model: str, words: list[str], usage: bool = False) -> list[bytes]:
    chunks = []
    for i, word in enumerate(words):
        delta = {"content": word} | ({"role": "assistant"} if i == 0 else {})
        chunks.append(b"data: " + orjson.dumps({
            "id": "chatcmpl-stream-0001", "object": "chat.completion.chunk",
            "created": 1677652288, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        }) + b"\n\n")
    chunks.append(b"data: " + orjson.dumps({
        "id": "chatcmpl-stream-0001", "object": "chat.completion.chunk",
        "created": 1677652288, "model": model,
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    }) + b"\n\n")
    if usage:
        chunks.append(b"data: " + orjson.dumps({
            "id": "chatcmpl-stream-0001", "object": "chat.completion.chunk",
            "created": 1677652288, "model": model, "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": len(words),
                      "total_tokens": 5 + len(words)},
        }) + b"\n\n")
    chunks.append(b"data: [DONE]\n\n")
    return chunks


class FakeUpstream:
    def __init__(self) -> None:
        self.received: list[Received] = []
        # Scripts for the next requests, one each, then ``cycle`` round and
        # round (if set), then ``script`` for every request after that.
        self.queue: list[Script] = []
        self.cycle: list[Script] = []
        self.script = Script()
        self.url = ""
        self._served = 0
        # Set at stop: a stalled answer gives up, so shutdown never waits.
        self._stopping = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.request_seen = asyncio.Event()
        # Set when a client of ours hung up in the middle of a stream.
        self.disconnected = asyncio.Event()

    async def start(self) -> FakeUpstream:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _sleep(self, seconds: float) -> None:
        # A delay ends early at stop, so that shutdown never waits for it.
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    def then(self, *scripts: Script) -> FakeUpstream:
        self.queue.extend(scripts)
        return self

    def _next_script(self) -> Script:
        if self.queue:
            return self.queue.pop(0)
        if self.cycle:
            self._served += 1
            return self.cycle[(self._served - 1) % len(self.cycle)]
        return self.script

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append(Received(request.path_qs, dict(request.headers), body))
        self.request_seen.set()
        script = self._next_script()
        if script.stall is not None:
            await _either(script.stall, self._stopping)
        if script.delay:
            await self._sleep(script.delay)
        parsed = orjson.loads(body) if body else {}
        chunks = script.chunks
        if chunks is None and parsed.get("stream") is True and script.body is None:
            include = (parsed.get("stream_options") or {}).get("include_usage") is True
            chunks = sse_chunks(parsed.get("model", "?"), ["Hello", " there", "!"], include)
        if chunks is not None and script.status == 200:
            response = web.StreamResponse(
                status=200, headers={"Content-Type": "text/event-stream"} | script.headers
            )
            await response.prepare(request)
            if script.split:
                whole = b"".join(chunks)
                chunks = [whole[i:i + script.split]
                          for i in range(0, len(whole), script.split)]
            for i, chunk in enumerate(chunks):
                if script.stall_after is not None and i == script.stall_after:
                    await self._stopping.wait()
                    return response
                if script.break_after is not None and i == script.break_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(chunk)
                if script.hold_after is not None and i + 1 == script.hold_after:
                    if not await self._hold(request, script):
                        return response
                if script.chunk_delay:
                    await asyncio.sleep(script.chunk_delay)
            await response.write_eof()
            return response
        payload = script.body
        if payload is None:
            payload = orjson.dumps(completion(parsed.get("model", "?")))
        return web.Response(status=script.status, body=payload,
                            content_type=script.content_type, headers=script.headers)

    async def _hold(self, request: web.Request, script: Script) -> bool:
        """Wait for the test's release; False if the client hung up first."""
        assert script.release is not None
        while not script.release.is_set():
            transport = request.transport
            if transport is None or transport.is_closing():
                self.disconnected.set()
                return False
            try:
                await asyncio.wait_for(script.release.wait(), 0.02)
            except asyncio.TimeoutError:
                pass
        return True

async def _either(first: asyncio.Event, second: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(first.wait()), asyncio.ensure_future(second.wait())]
    _, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in pending:
        waiter.cancel()
