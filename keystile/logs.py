"""Log output: one line per record on stderr, cheap enough for every request.

The access log writes a line per request, so the usual setup (a flush and
a strftime per line) costs more than some of the policies.  Here lines go
to a block-buffered stderr that is flushed at least every half second, at
once for a WARNING or worse, and at exit.
"""

from __future__ import annotations

import atexit
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

__all__ = [
    "CLIENT_FAULTS",
    "FLUSH_INTERVAL",
    "access_writer",
    "configure_logging",
    "flush_logs",
]

FLUSH_INTERVAL = 0.5
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Formatter(logging.Formatter):
    """The standard layout, formatting each second's date only once."""

    def __init__(self) -> None:
        super().__init__(_FORMAT)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.timestamp(record.created)

    def timestamp(self, moment: float) -> str:
        second = int(moment)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._text},{int((moment - second) * 1000):03d}"


class _BufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def __init__(self, stream: Any, formatter: _Formatter) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self._timestamps = formatter

    def write_access(self, line: str) -> None:
        # The one line per request, in the layout every other line has,
        # without building a LogRecord: under load that machinery costs
        # more per request than all the policies together.  Only the event
        # loop's thread writes these, so the handler's lock is not needed.
        self.stream.write(
            f"{self._timestamps.timestamp(time.time())} INFO keystile.access: {line}\n"
        )

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            if record.levelno >= logging.WARNING:
                self.stream.flush()
        except Exception:
            self.handleError(record)


class _ClientFaults(logging.Filter):
    """aiohttp logs every request it cannot parse or decode as an error
    with a traceback, so any client could fill the log with them.  It is
    the client's fault, not ours: a DEBUG line, without the exception's
    text, which may quote the request (and a key in one of its headers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, (HttpProcessingError, RequestPayloadError)):
            # The access log has a line for the request already; this one
            # only says why, for whoever turns DEBUG on.
            record.msg = "malformed request: %s"
            record.args = (type(error).__name__,)
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
        return True


# Installed on aiohttp's server logger by the server.
CLIENT_FAULTS = _ClientFaults()

_handler: _BufferedHandler | None = None


def configure_logging(level: str) -> None:
    global _handler
    # Our lines name neither caller, thread nor process; the logging HOWTO's
    # "Optimization" section lists these switches for skipping that work.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream = open(  # noqa: SIM115 - lives as long as the process
        sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8",
        errors="backslashreplace", closefd=False,
    )
    _handler = _BufferedHandler(stream, _Formatter())
    logging.basicConfig(level=level.upper(), handlers=[_handler], force=True)
    atexit.register(flush_logs)


def access_writer() -> Callable[[str], None] | None:
    """Where access lines go when this module set up logging, else None.

    None means logging was set up some other way (tests, an embedding
    application): access lines then go through the ``keystile.access``
    logger like any other record.
    """
    return _handler.write_access if _handler is not None else None


def flush_logs() -> None:
    if _handler is not None:
        _handler.flush()
