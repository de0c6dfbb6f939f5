"""Cutting a server-sent-events byte stream into whole events.

The relay forwards events, not network reads: an event is passed on the
moment its closing blank line arrives, byte for byte as the upstream wrote
it, so a multi-byte character split across two reads is never cut.
"""

from __future__ import annotations

import re

__all__ = ["EventSplitter"]

# An event ends at a blank line; the SSE spec allows \n, \r\n and \r.
_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


class EventSplitter:
    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events completed by ``chunk``, each with its blank line."""
        data = self._pending + chunk if self._pending else chunk
        events = []
        start = 0
        for match in _END.finditer(data):
            events.append(data[start:match.end()])
            start = match.end()
        self._pending = data[start:]
        return events

    def rest(self) -> bytes:
        """Bytes of an event the stream never finished."""
        rest, self._pending = self._pending, b""
        return rest
