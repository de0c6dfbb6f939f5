"""Streams go to the client as the upstream sends them, and stop when the client does."""

from __future__ import annotations

import asyncio

import aiohttp

from .conftest import Proxy
from .fakes import FakeUpstream, Script, sse_chunks

BODY = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hi"}],
        "stream": True}


async def test_first_event_arrives_while_the_upstream_is_still_holding(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    chunks = sse_chunks("gpt-3.5-turbo-0125", ["one", " two"])
    upstream.script = Script(chunks=chunks, hold_after=1, release=asyncio.Event())
    key = await proxy.generate()

    async with proxy.session.post(proxy.url + "/v1/chat/completions", json=BODY,
                                  headers={"Authorization": f"Bearer {key}"}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Cache-Control"] == "no-cache"
        assert response.headers["X-Accel-Buffering"] == "no"
        # Had the proxy buffered, this read would wait for a release that
        # only comes after it.
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 5)
        assert first == chunks[0]
        upstream.script.release.set()
        rest = await response.read()

    assert first + rest == b"".join(chunks)
    assert rest.endswith(b"data: [DONE]\n\n") and rest.count(b"[DONE]") == 1


async def test_client_hanging_up_cancels_the_upstream_request(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    chunks = sse_chunks("gpt-3.5-turbo-0125", ["one", " two"])
    upstream.script = Script(chunks=chunks, hold_after=1, release=asyncio.Event())
    key = await proxy.generate()

    async with aiohttp.ClientSession() as session:
        response = await session.post(proxy.url + "/chat/completions", json=BODY,
                                       headers={"Authorization": f"Bearer {key}"})
        await response.content.readuntil(b"\n\n")
        response.close()  # hang up mid-stream

    await asyncio.wait_for(upstream.disconnected.wait(), 5)
