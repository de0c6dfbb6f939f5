"""Running the application: the listening socket, the access log, signals."""

from __future__ import annotations

import asyncio
import logging
import signal
import sqlite3

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .app import create_app
from .config import Config
from .logs import CLIENT_FAULTS, FLUSH_INTERVAL, access_writer, flush_logs
from .state import CONTEXT
from .tracing import REQUEST_ID

__all__ = ["AccessLogger", "StartupError", "serve", "start"]

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("keystile.access")


class StartupError(Exception):
    """The proxy cannot start; the message says what to fix."""


_LINE = (
    "%s %s %s %d %.1fms key=%s model=%s deployment=%s retries=%d fallback=%s request_id=%s"
)


class AccessLogger(AbstractAccessLogger):
    """One line per request: never a key, a query string or a header value."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        ctx = request.get(CONTEXT)
        caller, group, deployment, retries, fallback = "-", "-", "-", 0, "-"
        if ctx is not None:
            if ctx.is_master:
                caller = "master"
            elif ctx.key is not None:
                caller = ctx.key.key_alias or ctx.key.key_name
            group = ctx.model_group or "-"
            deployment = ctx.deployment.id if ctx.deployment is not None else "-"
            if ctx.route is not None:
                retries = ctx.route.retries
                fallback = ctx.route.fallback or "-"
        # The path only: a query string may carry a key (/key/info?key=).
        line = _LINE % (
            request.remote, request.method, request.path, response.status,
            time * 1000, caller, group, deployment, retries, fallback,
            response.headers.get(REQUEST_ID, "-"),
        )
        if not line.isprintable():
            # A path may carry any decoded character, a newline included:
            # escaped, it cannot pass for a line of its own.
            line = line.encode("unicode_escape").decode("ascii")
        write = access_writer()
        if write is None:
            self.logger.info("%s", line)
        else:
            write(line)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)


async def start(
    config: Config, host: str, port: int, *, reload_interval: float = 1.0
) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner and the port actually bound."""
    logging.getLogger("aiohttp.server").addFilter(CLIENT_FAULTS)
    app = create_app(config, reload_interval=reload_interval)
    runner = web.AppRunner(
        app,
        # A client that hangs up cancels its request, and so the upstream
        # call made for it.
        handler_cancellation=True,
        access_log_class=AccessLogger,
        access_log=access_logger,
    )
    try:
        await runner.setup()
    except (OSError, sqlite3.Error, RuntimeError) as exc:
        raise StartupError(f"cannot open the database {config.database_path}: {exc}") from exc
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise StartupError(f"cannot serve on {host}:{port}: {exc.strerror}") from exc
    except BaseException:
        await runner.cleanup()
        raise
    bound = port
    for address in runner.addresses:
        bound = address[1]
        break
    return runner, bound


async def serve(config: Config, host: str, port: int) -> None:
    """Serve until SIGINT or SIGTERM, then shut down cleanly."""
    # Handlers first: a signal that arrives while starting up still means
    # a clean stop, not a kill.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    runner, bound = await start(config, host, port)
    logger.info(
        "Keystile listening on http://%s:%d models=%s database=%s",
        host, bound, ",".join(config.model_names) or "(none)", config.database_path,
    )
    flusher = asyncio.create_task(_flush_logs_often())
    try:
        await stop.wait()
        logger.info("shutting down")
    finally:
        flusher.cancel()
        await runner.cleanup()
        flush_logs()


async def _flush_logs_often() -> None:
    # Buffered log lines reach stderr within this interval even when quiet.
    while True:
        await asyncio.sleep(FLUSH_INTERVAL)
        flush_logs()
