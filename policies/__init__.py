"""The policy chain every proxied request passes, in order."""

from __future__ import annotations

from keystile.config import Config
from keystile.router import Router
from keystore import Keystore

from .auth import Authenticate
from .base import Context, Policy
from .limits import Limits
from .model_access import ModelAccess
from .required_params import RequiredParams
from .routing import Route

__all__ = ["Context", "Policy", "build_chain"]


def build_chain(config: Config, keystore: Keystore, router: Router) -> list[Policy]:
    """The chain, in the one order it runs in."""
    return [
        Authenticate(keystore, config.master_key),
        RequiredParams(
            config.enforced_params,
            config.service_account_params,
            config.param_headers,
        ),
        ModelAccess(router),
        Limits(keystore),
        Route(router),
    ]
