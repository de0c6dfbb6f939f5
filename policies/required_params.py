"""Required body params: global, for service accounts, and per key."""

from __future__ import annotations

from typing import Any

from keystile.errors import BadRequest

from .base import Context, Policy

__all__ = ["RequiredParams", "find_param"]

_MISSING = object()


def find_param(body: dict[str, Any], path: str) -> Any:
    """The value at a dotted path, or None when any step is missing.

    Each step must be an object holding the next name, so a flat key that
    happens to contain a dot never satisfies a nested path.
    """
    value: Any = body
    for name in path.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _is_text(value: str) -> bool:
    # Undecodable header bytes arrive as lone surrogates, which no JSON
    # body (and no SQLite row) can carry.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _present(value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, str) and not value.strip():
        return False
    return True


class RequiredParams(Policy):
    name = "required_params"

    def __init__(
        self,
        global_params: tuple[str, ...],
        service_account_params: tuple[str, ...],
        param_headers: dict[str, str],
    ) -> None:
        self.global_params = global_params
        self.service_account_params = service_account_params
        self.param_headers = param_headers

    async def check(self, ctx: Context) -> None:
        key = ctx.key
        if key is None or ctx.body is None:
            # The master key is exempt, and so are routes without a body.
            if ctx.is_master:
                ctx.notes[self.name] = "the master key is exempt"
            return
        if key.is_service_account:
            self._require(ctx, self.service_account_params, " for service account")
        self._require(ctx, self.global_params, "")
        self._require(ctx, key.enforced_params, "")
        ctx.notes[self.name] = "every required param is present"

    def _require(self, ctx: Context, params: tuple[str, ...], whose: str) -> None:
        assert ctx.body is not None
        for param in params:
            if _present(find_param(ctx.body, param)):
                continue
            header = self.param_headers.get(param)
            value = ctx.headers.get(header, "").strip() if header else ""
            if value:
                if not _is_text(value):
                    raise BadRequest(
                        f"Header {header} must be UTF-8 text to stand in for {param}",
                        param=param,
                    )
                ctx.body_changes[param] = value
                continue
            # The wording is LiteLLM's, kept byte for byte: clients and
            # their tests match on it.
            raise BadRequest(
                f"BadRequest please pass param={param} in request body. "
                f"This is a required param{whose}",
                param=param,
                type="bad_request_error",
            )
