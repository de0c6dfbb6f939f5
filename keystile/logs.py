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

__all__ = ["FLUSH_INTERVAL", "configure_logging", "flush_logs"]

FLUSH_INTERVAL = 0.5
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Formatter(logging.Formatter):
    """The standard layout, formatting each second's date only once."""

    def __init__(self) -> None:
        super().__init__(_FORMAT)
        self._second = -1
        self._text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
        return f"{self._text},{int(record.msecs):03d}"


class _BufferedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + "\n")
            if record.levelno >= logging.WARNING:
                self.stream.flush()
        except Exception:
            self.handleError(record)


_handler: _BufferedHandler | None = None


def configure_logging(level: str) -> None:
    global _handler
    # Our lines name neither caller, thread nor process; the logging HOWTO's
    # "Optimization" section lists these switches for skipping that work.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    stream = open(  # noqa: SIM115 - lives as long as the process
        sys.stderr.fileno(), "w", buffering=1 << 16, encoding="utf-8",
        errors="backslashreplace", closefd=False,
    )
    _handler = _BufferedHandler(stream)
    _handler.setFormatter(_Formatter())
    logging.basicConfig(level=level.upper(), handlers=[_handler], force=True)
    atexit.register(flush_logs)


def flush_logs() -> None:
    if _handler is not None:
        _handler.flush()
