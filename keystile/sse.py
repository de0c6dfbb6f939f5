"""Cutting a server-sent-events byte stream into whole events.

The relay forwards events, not network reads: an event is passed on the
moment its closing blank line arrives, byte for byte as the upstream wrote
it, so a multi-byte character split across two reads is never cut.
"""

from __future__ import annotations

import re

__all__ = ["MAX_EVENT", "EventSplitter", "EventTooLarge"]

# An event ends at a blank line; the SSE spec allows \n, \r\n and \r.
_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# The longest end marker, less one: how far back a marker split across two
# reads can begin.
_OVERLAP = 3
# Far beyond any real event (a whole tool call's arguments fit many times);
# an upstream that sends more without a blank line is not speaking SSE.
MAX_EVENT = 8 * 1024 * 1024


class EventTooLarge(ValueError):
    """The upstream sent more than MAX_EVENT bytes without ending an event."""


class EventSplitter:
    def __init__(self) -> None:
        # The unfinished event, as the reads that brought it: joined only
        # once it ends, so a long event costs linear time, not quadratic.
        self._parts: list[bytes] = []
        self._size = 0
        # The last bytes of the unfinished event, where a marker split
        # across reads would begin (reads may be shorter than a marker).
        self._tail = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The events completed by ``chunk``, each with its blank line."""
        scan_from = 0
        if self._parts:
            tail = self._tail
            if _END.search(tail + chunk) is None:
                self._parts.append(chunk)
                self._size += len(chunk)
                self._tail = (tail + chunk)[-_OVERLAP:]
                if self._size > MAX_EVENT:
                    raise EventTooLarge(
                        f"the upstream sent over {MAX_EVENT // (1024 * 1024)} MiB "
                        "without ending an event"
                    )
                return []
            scan_from = self._size - len(tail)
            data = b"".join(self._parts) + chunk
            self._parts, self._size, self._tail = [], 0, b""
        else:
            data = chunk
        events = []
        start = 0
        for match in _END.finditer(data, scan_from):
            events.append(data[start:match.end()])
            start = match.end()
        if start < len(data):
            rest = data[start:]
            self._parts, self._size, self._tail = [rest], len(rest), rest[-_OVERLAP:]
            if self._size > MAX_EVENT:
                raise EventTooLarge(
                    f"the upstream sent over {MAX_EVENT // (1024 * 1024)} MiB "
                    "without ending an event"
                )
        return events

    def rest(self) -> bytes:
        """Bytes of an event the stream never finished."""
        rest = b"".join(self._parts)
        self._parts, self._size, self._tail = [], 0, b""
        return rest
