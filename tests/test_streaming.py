"""Streams: retried before the first byte, relayed byte for byte after it."""

from __future__ import annotations

import orjson
import pytest

from .conftest import MakeProxy
from .fakes import Script, sse_chunks
from .routes import MESSAGES, config, deployment, raw_stream

UNICODE_EVENTS = [
    b": keep-alive comment\n\n",
    b'data: {"choices":[{"delta":{"content":"h\xc3\xa9llo \xe6\x97\xa5\xe6\x9c\xac '
    b'\xf0\x9f\x8e\x89"}}]}\n\n',
    b"event: message\r\ndata: {\"choices\":[{\"delta\":{\"content\":\"\xc3\xb1\"}}]}\r\n\r\n",
]


def _data_events(raw: bytes) -> list[bytes]:
    return [line[len(b"data: "):] for line in raw.split(b"\n") if line.startswith(b"data: ")]


@pytest.mark.parametrize("split", [None, 1, 3, 7])
async def test_events_arrive_byte_exact(make_proxy: MakeProxy, make_upstream,
                                        split: int | None) -> None:
    fake = await make_upstream()
    sent = UNICODE_EVENTS + [b"data: [DONE]\n\n"]
    fake.script = Script(chunks=sent, split=split, chunk_delay=0.001 if split else 0)
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")]))

    status, raw, headers = await raw_stream(proxy, "gpt-4o")

    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    assert raw == b"".join(sent)


async def test_a_clean_end_without_done_gets_exactly_one(
    make_proxy: MakeProxy, make_upstream
) -> None:
    fake = await make_upstream()
    fake.script = Script(chunks=UNICODE_EVENTS[:2])
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")]))

    _, raw, _ = await raw_stream(proxy, "gpt-4o")

    assert raw == b"".join(UNICODE_EVENTS[:2]) + b"data: [DONE]\n\n"


async def test_nothing_after_the_upstream_done_is_relayed(
    make_proxy: MakeProxy, make_upstream
) -> None:
    fake = await make_upstream()
    chunks = sse_chunks("m", ["a", "b"])
    fake.script = Script(chunks=chunks + [b"data: [DONE]\n\n"], split=5)
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")]))

    _, raw, _ = await raw_stream(proxy, "gpt-4o")

    assert raw == b"".join(chunks)
    assert raw.count(b"[DONE]") == 1


async def test_a_break_mid_stream_ends_with_one_error_event(
    make_proxy: MakeProxy, make_upstream
) -> None:
    first, second = await make_upstream(), await make_upstream()
    chunks = sse_chunks("m", ["Hello", " there", "!"])
    first.script = second.script = Script(chunks=chunks, break_after=2)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", first, "a"), deployment("gpt-4o", second, "b")],
    ))

    status, raw, _ = await raw_stream(proxy, "gpt-4o")

    assert status == 200
    assert raw.startswith(chunks[0] + chunks[1])
    events = _data_events(raw)
    error = orjson.loads(events[-1])["error"]
    assert error["type"] == "upstream_error"
    assert error["code"] == "502"
    assert "broke off" in error["message"]
    assert b"[DONE]" not in raw
    assert raw.endswith(b"\n\n")
    # Bytes had gone out: nothing is retried.
    assert len(first.received) + len(second.received) == 1


async def test_the_openai_client_raises_on_the_error_event(
    make_proxy: MakeProxy, make_upstream
) -> None:
    import openai

    fake = await make_upstream()
    fake.script = Script(chunks=sse_chunks("m", ["Hello", " there"]), break_after=2)
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")]))
    client = proxy.openai(proxy.master_key)

    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                                  stream=True)
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass

    assert "broke off" in str(caught.value)


async def test_a_stall_mid_stream_ends_with_a_timeout_event(
    make_proxy: MakeProxy, make_upstream
) -> None:
    fake = await make_upstream()
    fake.script = Script(chunks=sse_chunks("m", ["Hello", " there"]), stall_after=1)
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only", timeout=0.5)]))

    _, raw, _ = await raw_stream(proxy, "gpt-4o")

    error = orjson.loads(_data_events(raw)[-1])["error"]
    assert error["type"] == "timeout_error" and error["code"] == "504"
    assert b"[DONE]" not in raw


@pytest.mark.parametrize("silent", [
    Script(delay=5),  # no headers at all
    Script(chunks=sse_chunks("m", ["x"]), stall_after=0),  # headers, then nothing
])
async def test_a_silent_stream_is_retried_after_stream_timeout(
    make_proxy: MakeProxy, make_upstream, silent: Script
) -> None:
    quiet, lively = await make_upstream(), await make_upstream()
    quiet.script = silent
    proxy = await make_proxy(config([
        deployment("gpt-4o", quiet, "quiet", order=1, stream_timeout=0.3),
        deployment("gpt-4o", lively, "lively", order=2),
    ]))

    status, raw, headers = await raw_stream(proxy, "gpt-4o")

    assert status == 200
    assert headers["x-keystile-deployment-id"] == "lively"
    assert headers["x-keystile-retries"] == "1"
    assert raw.endswith(b"data: [DONE]\n\n") and b'"error"' not in raw


async def test_a_silent_stream_with_nowhere_to_go_is_a_504(
    make_proxy: MakeProxy, make_upstream
) -> None:
    fake = await make_upstream()
    fake.script = Script(delay=5)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", fake, "only", stream_timeout=0.2)], num_retries=1,
    ))

    status, raw, headers = await raw_stream(proxy, "gpt-4o")

    assert status == 504
    assert headers["Content-Type"].startswith("application/json")
    assert orjson.loads(raw)["error"]["message"] == (
        "The upstream for 'gpt-4o' did not answer within 0.2 s"
    )
    assert len(fake.received) == 2


async def test_stream_errors_before_the_first_byte_are_retried(
    make_proxy: MakeProxy, make_upstream
) -> None:
    fake = await make_upstream()
    fake.then(Script(status=503), Script(chunks=[], status=200))
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")], num_retries=2))

    status, raw, headers = await raw_stream(proxy, "gpt-4o")

    assert status == 200
    assert headers["x-keystile-retries"] == "2"
    assert raw.count(b"data: [DONE]\n\n") == 1


async def test_a_stream_answered_with_json_is_a_502(make_proxy: MakeProxy, make_upstream) -> None:
    fake = await make_upstream()
    fake.script = Script(body=b'{"id": "not a stream"}')
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")], num_retries=0))

    status, raw, _ = await raw_stream(proxy, "gpt-4o")

    assert status == 502
    assert "not an event stream" in orjson.loads(raw)["error"]["message"]
