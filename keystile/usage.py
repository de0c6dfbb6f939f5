"""Measuring one request for the usage ledger: tokens, cost and timings.

The proxy handler makes a ``Meter`` per request and records it when the
request ends, whatever the outcome.  The relay feeds it what passes by: a
whole JSON answer (``body``) or each SSE event of a stream (``events``).
For a stream the upstream is asked for its usage (``prepare``); when the
client did not ask for it, that extra chunk is taken out again before the
client sees it.  A stream cut off before its usage arrives is estimated
from the characters relayed, and flagged, so hanging up early does not
make a request free.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import orjson
from aiohttp import web

from keystore import Keystore, UsageRow
from policies import Context

from .config import Deployment

__all__ = ["CLIENT_GONE", "METER", "STREAM_USAGE_OPTION", "Meter", "record"]

# The usual rule of thumb for English text with OpenAI's tokenizers.
CHARS_PER_TOKEN = 4
# The text fields of a chunk, found without parsing it: counting characters
# must cost next to nothing, since it only matters for a cut-off stream.
# Where a text field's string starts, in compact JSON or with spaces around
# the colon (as Python's json module and some servers write it).
_TEXT_FIELD = re.compile(rb'"(?:content|text|arguments)"\s*:\s*"')
_BACKSLASH = 0x5C
# The status recorded when the client hung up (nginx's convention).
CLIENT_GONE = 499
# Stream events are counted for an estimate only when the stream ends
# without usage, which is rare; until then they are kept, up to this many
# bytes per request, and counted when more arrive.
_UNCOUNTED_BYTES = 64 * 1024


# More tokens than any model answers with in one request.
_MAX_TOKENS = 1 << 31
# The body change that asks a streaming upstream for its usage chunk.
STREAM_USAGE_OPTION = "stream_options.include_usage"


class Meter:
    """What one request used and how long it took."""

    __slots__ = (
        "_start",
        "_uncounted",
        "_uncounted_bytes",
        "answered",
        "chars",
        "client_gone",
        "completion_tokens",
        "prompt_tokens",
        "strip",
        "time",
        "ttfb",
    )

    def __init__(self) -> None:
        self.time = time.time()
        self._start = time.perf_counter()
        self.ttfb: float | None = None
        # None until the upstream reports usage.
        self.prompt_tokens: int | None = None
        self.completion_tokens: int | None = None
        self.chars = 0  # answer characters relayed, for an estimate
        self._uncounted: list[bytes] = []  # events relayed but not yet in chars
        self._uncounted_bytes = 0
        self.strip = False  # the client did not ask for the usage chunk
        self.client_gone = False  # the client hung up while the answer streamed
        self.answered = False  # a whole JSON answer has been counted

    def prepare(self, ctx: Context) -> None:
        """Ask the upstream for usage in a stream; runs after the chain."""
        body = ctx.body
        if body is None or body.get("stream") is not True or ctx.endpoint == "embeddings":
            return
        deployment: Deployment = ctx.deployment
        if not deployment.stream_usage:
            return
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return
        ctx.body_changes[STREAM_USAGE_OPTION] = True
        self.strip = True

    def _first_bytes(self) -> None:
        if self.ttfb is None:
            self.ttfb = time.perf_counter() - self._start

    def body(self, raw: bytes) -> None:
        """A whole JSON answer, unless the relay already handed it over parsed."""
        if self.answered:
            return
        try:
            parsed = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return
        if isinstance(parsed, dict):
            self.answer(parsed)

    def answer(self, parsed: dict[str, Any]) -> None:
        """A whole JSON answer, already parsed."""
        self._first_bytes()
        self.answered = True
        if not self._take(parsed.get("usage")):
            self._count(parsed.get("choices"), "message")

    def events(self, events: list[bytes]) -> list[bytes]:
        """SSE events on their way to the client; returns the ones to send."""
        if self.ttfb is None:
            self._first_bytes()
        kept = events
        for event in events:
            # Only the usage chunk is parsed; OpenAI sends "usage":null in
            # every other chunk once usage is asked for.
            if b'"usage"' not in event or b'"usage":null' in event:
                if self.prompt_tokens is None:
                    self._uncounted.append(event)
                    self._uncounted_bytes += len(event)
                    if self._uncounted_bytes > _UNCOUNTED_BYTES:
                        self._count_events()
                continue
            data = _data(event)
            try:
                chunk = orjson.loads(data) if data is not None else None
            except orjson.JSONDecodeError:
                continue  # not ours to judge
            if isinstance(chunk, dict) and self._take(chunk.get("usage")):
                if self.strip and not chunk.get("choices"):
                    if kept is events:
                        kept = list(events)
                    kept.remove(event)
        return kept

    def _take(self, usage: Any) -> bool:
        if not isinstance(usage, dict):
            return False
        self.prompt_tokens = _token_count(usage.get("prompt_tokens"))
        self.completion_tokens = _token_count(usage.get("completion_tokens"))
        self._uncounted.clear()  # no estimate needed any more
        return True

    def _count_events(self) -> None:
        self.chars += sum(_text_chars(event) for event in self._uncounted)
        self._uncounted.clear()
        self._uncounted_bytes = 0

    def _count(self, choices: Any, part: str) -> None:
        if not isinstance(choices, list):
            return
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            text = choice.get("text")
            if isinstance(text, str):
                self.chars += len(text)
            message = choice.get(part)
            if isinstance(message, dict):
                self.chars += _message_chars(message)

    def row(self, ctx: Context, status: int) -> UsageRow:
        deployment: Deployment | None = ctx.deployment
        key = ctx.key
        body = ctx.body or {}
        user = ctx.body_changes.get("user", body.get("user"))
        row = UsageRow(
            time=self.time,
            key_hash=key.token if key is not None else None,
            key_alias=key.key_alias if key is not None else None,
            account_type=key.account_type if key is not None else "master",
            end_user=user if isinstance(user, str) else None,
            endpoint=ctx.endpoint,
            model_group=ctx.model_group,
            deployment_id=deployment.id if deployment is not None else None,
            status=status,
            latency_ms=(time.perf_counter() - self._start) * 1000,
            ttfb_ms=None if self.ttfb is None else self.ttfb * 1000,
        )
        if self.prompt_tokens is not None:
            row.prompt_tokens = self.prompt_tokens
            row.completion_tokens = self.completion_tokens or 0
        elif deployment is not None and (status < 400 or status == CLIENT_GONE):
            # The upstream got the request and never said what it used: a
            # stream cut off, a client gone, a server that reports nothing.
            self._count_events()
            row.prompt_tokens = _tokens(_prompt_chars(body))
            row.completion_tokens = _tokens(self.chars)
            row.estimated = True
        if deployment is not None:
            row.cost = (row.prompt_tokens * deployment.input_cost_per_token
                        + row.completion_tokens * deployment.output_cost_per_token)
        return row


METER = web.RequestKey("meter", Meter)


def _token_count(value: Any) -> int:
    # A count no real answer reaches is an upstream's bug; it must not
    # wreck the ledger or a budget, so it counts as nothing reported.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_TOKENS:
        return value
    return 0


async def record(keystore: Keystore, ctx: Context, meter: Meter, status: int) -> None:
    """Put one finished request in the ledger and on its key's counters."""
    row = meter.row(ctx, status)
    keystore.record_usage(row, ctx.key)
    key = ctx.key
    if key is not None and key.tpm_limit is not None:
        await keystore.counters.add_tokens(key, row.prompt_tokens + row.completion_tokens)


def _data(event: bytes) -> bytes | None:
    """The data of one SSE event, or None when it carries none."""
    if event.startswith(b"data: ") and event.count(b"\n") <= 2:
        return event[6:].strip()
    lines = [
        line[5:].lstrip(b" ") for line in event.splitlines() if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None


def _text_chars(event: bytes) -> int:
    """Characters in an event's text fields; escapes count as two (an estimate)."""
    chars = 0
    for marker in _TEXT_FIELD.finditer(event):
        start = marker.end()
        end = event.find(b'"', start)
        while end != -1 and event[end - 1] == _BACKSLASH:
            end = event.find(b'"', end + 1)
        if end == -1:
            break
        chars += end - start
    return chars


def _tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)


def _message_chars(message: dict[str, Any]) -> int:
    chars = 0
    content = message.get("content")
    if isinstance(content, str):
        chars += len(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                chars += len(part["text"])
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict) and isinstance(function.get("arguments"), str):
            chars += len(function["arguments"])
    return chars


def _prompt_chars(body: dict[str, Any]) -> int:
    chars = 0
    messages = body.get("messages")
    if isinstance(messages, list):
        chars += sum(_message_chars(m) for m in messages if isinstance(m, dict))
    for name in ("prompt", "input"):
        value = body.get(name)
        if isinstance(value, str):
            chars += len(value)
        elif isinstance(value, list):
            chars += sum(len(v) for v in value if isinstance(v, str))
    return chars
