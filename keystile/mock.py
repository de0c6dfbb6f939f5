"""The built-in ``mock/`` model: deterministic answers with no network.

It lets the shipped config work on a fresh machine with no API key, and it
answers in the same shapes as OpenAI (including SSE for ``stream: true``)
so that clients cannot tell it from a real upstream.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from typing import Any

import orjson
from aiohttp import web

from .config import Deployment
from .tracing import add_response_headers
from .usage import METER

__all__ = ["mock_response"]

_FINGERPRINT = "fp_keystile_mock"


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _prompt_text(body: dict[str, Any]) -> str:
    parts: list[str] = []
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(
                item.get("text", "") for item in content
                if isinstance(item, dict) and isinstance(item.get("text"), str)
            )
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        parts.append(prompt)
    return " ".join(parts)


def _reply(prompt: str) -> str:
    # Deterministic and short: the same prompt always gets the same answer.
    last = " ".join(prompt.split()[-8:]) or "nothing"
    return f"Hello! This is Keystile's mock model. You said: {last}"


def _usage(prompt: str, reply: str) -> dict[str, Any]:
    prompt_tokens, completion_tokens = _words(prompt), _words(reply)
    return {
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": None,
    }


def _id(prefix: str, body: bytes) -> str:
    return prefix + hashlib.sha256(body).hexdigest()[:24]


async def mock_response(
    request: web.Request,
    endpoint: str,
    body: dict[str, Any],
    raw_body: bytes,
    deployment: Deployment,
) -> web.StreamResponse:
    model = deployment.upstream_model
    prompt = _prompt_text(body)
    created = int(time.time())
    if endpoint == "embeddings":
        return web.Response(body=orjson.dumps(_embeddings(body, model)),
                            content_type="application/json")
    reply = _reply(prompt)
    if body.get("stream") is True:
        return await _stream(request, endpoint, body, raw_body, model, prompt, reply)
    if endpoint == "completions":
        payload: dict[str, Any] = {
            "id": _id("cmpl-", raw_body),
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [{"text": reply, "index": 0, "logprobs": None,
                         "finish_reason": "stop"}],
            "usage": _usage(prompt, reply),
        }
    else:
        payload = {
            "id": _id("chatcmpl-", raw_body),
            "choices": [{
                "finish_reason": "stop",
                "index": 0,
                "message": {"content": reply, "role": "assistant",
                            "tool_calls": None, "function_call": None},
            }],
            "created": created,
            "model": model,
            "object": "chat.completion",
            "system_fingerprint": _FINGERPRINT,
            "usage": _usage(prompt, reply),
            "service_tier": None,
        }
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


async def _stream(
    request: web.Request,
    endpoint: str,
    body: dict[str, Any],
    raw_body: bytes,
    model: str,
    prompt: str,
    reply: str,
) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
    })
    add_response_headers(request, response)
    await response.prepare(request)
    meter = request.get(METER)

    async def send(event: bytes) -> None:
        # The same metering a relayed stream gets.
        events = meter.events([event]) if meter is not None else [event]
        if events:
            await response.write(events[0])

    created = int(time.time())
    chat = endpoint != "completions"
    stream_id = _id("chatcmpl-" if chat else "cmpl-", raw_body)
    pieces = [word + " " for word in reply.split(" ")]
    pieces[-1] = pieces[-1].rstrip()
    for i, piece in enumerate(pieces + [None]):
        finish = "stop" if piece is None else None
        if chat:
            delta: dict[str, Any] = {} if piece is None else {"content": piece}
            if i == 0:
                delta["role"] = "assistant"
            choice: dict[str, Any] = {"index": 0, "delta": delta,
                                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": piece or "", "logprobs": None,
                      "finish_reason": finish}
        await send(_event({
            "id": stream_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": _FINGERPRINT,
            "choices": [choice],
        }))
    options = body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        await send(_event({
            "id": stream_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [],
            "usage": _usage(prompt, reply),
        }))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


def _event(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _embeddings(body: dict[str, Any], model: str) -> dict[str, Any]:
    inputs = body.get("input")
    texts = inputs if isinstance(inputs, list) else [inputs]
    data = []
    for index, text in enumerate(texts):
        digest = hashlib.sha256(str(text).encode()).digest()
        vector = [round((byte - 127.5) / 127.5, 6) for byte in digest[:16]]
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    tokens = sum(_words(str(text)) for text in texts)
    return {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
