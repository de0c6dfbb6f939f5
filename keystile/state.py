"""Typed keys for the objects the application shares between handlers."""

from __future__ import annotations

from aiohttp import web

from keystore import Keystore
from policies import Policy
from policies.auth import Authenticate

from .config import Config
from .context import CONTEXT
from .keys import KeyService
from .relay import Relay
from .router import Router

__all__ = ["AUTH", "CHAIN", "CONFIG", "CONTEXT", "KEYS", "KEYSTORE", "RELAY", "ROUTER"]

CONFIG = web.AppKey("config", Config)
KEYSTORE = web.AppKey("keystore", Keystore)
KEYS = web.AppKey("keys", KeyService)
ROUTER = web.AppKey("router", Router)
AUTH = web.AppKey("auth", Authenticate)
CHAIN = web.AppKey("chain", list[Policy])
RELAY = web.AppKey("relay", Relay)
