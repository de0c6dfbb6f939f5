"""The admin page: a few static files served from the package, no build step.

The files are read once, when the routes are added, so a request never
touches the disk.  Each answer carries an ETag and ``no-cache``: browsers
keep their copy and revalidate it, so an upgraded proxy is never paired
with a stale script.  The Content-Security-Policy lets the page load and
call only the proxy's own origin, with no inline script or style, so even a
value that slipped into the page as markup could not run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .guard import Routes

__all__ = ["SECURITY_HEADERS", "add_routes"]

UI_DIR = Path(__file__).with_name("ui")

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'; object-src 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",
}


@dataclass(frozen=True, slots=True)
class _File:
    body: bytes
    content_type: str
    etag: str


def _load(path: Path) -> _File:
    body = path.read_bytes()
    etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
    return _File(body, _TYPES[path.suffix], etag)


def _handler(file: _File) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def serve(request: web.Request) -> web.Response:
        headers = SECURITY_HEADERS | {"ETag": file.etag}
        if file.etag in request.headers.get("If-None-Match", ""):
            return web.Response(status=304, headers=headers)
        return web.Response(body=file.body, headers=headers | {
            "Content-Type": file.content_type,
        })

    return serve


def add_routes(routes: Routes) -> None:
    files = {path.name: _load(path) for path in sorted(UI_DIR.iterdir())
             if path.suffix in _TYPES}
    index = _handler(files.pop("index.html"))
    routes.add_get("/ui", index)
    routes.add_get("/ui/", index)
    for name, file in files.items():
        routes.add_get(f"/ui/{name}", _handler(file))
