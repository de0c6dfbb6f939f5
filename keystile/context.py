"""The request key under which a request's chain context is kept.

Its own module so that the code writing response headers and the access
log can reach it without importing the whole application.
"""

from __future__ import annotations

from aiohttp import web

from policies import Context

__all__ = ["CONTEXT"]

CONTEXT = web.RequestKey("context", Context)
