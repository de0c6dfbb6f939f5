"""Streams go to the client as the upstream sends them."""

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


async def test_stream_broken_by_the_upstream_ends_with_an_error_event(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    chunks = sse_chunks("gpt-3.5-turbo-0125", ["one", " two", " three"])
    upstream.script = Script(chunks=chunks, break_after=2)
    key = await proxy.generate()

    status, body, _ = await proxy.request("POST", "/chat/completions", key=key, json=BODY)

    assert status == 200
    events = body.split(b"\n\n")
    assert b"".join(e + b"\n\n" for e in events[:2]) == b"".join(chunks[:2])
    assert events[2].startswith(b'data: {"error":{"message":"The upstream for')
    assert b"[DONE]" not in body
