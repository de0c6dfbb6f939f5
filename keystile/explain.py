"""Explanations: a dry run of the policy chain for one key and one request.

An explanation runs the very chain a proxied request runs, in the same
order, on a context marked as a dry run: policies read but consume
nothing, and no upstream is called.  The answer says whether the request
would go through, which policy would stop it and with exactly which error,
and where it would be routed.  ``POST /route/explain`` and ``python
proxy.py explain`` both build their answer here, so they always agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from multidict import CIMultiDict, CIMultiDictProxy

from keystore import KeyRecord, hash_key
from policies import Context, Policy

from .errors import BadRequest, ProxyError, error_response
from .keys import KeyService
from .router import Router

__all__ = ["ENDPOINTS", "Subject", "context", "explain", "name_key", "split_body"]

# The names an explanation accepts for the endpoint it explains.
ENDPOINTS = {
    "chat": "chat/completions",
    "chat/completions": "chat/completions",
    "completions": "completions",
    "embeddings": "embeddings",
}
# Headers that carry a credential: an explanation for a named key must not
# judge the caller's own credential instead.
_CREDENTIAL_HEADERS = ("Authorization", "api-key", "x-api-key")
# What a check says when its policy passed without leaving a note.
_NO_NOTE = "nothing to check"


@dataclass(frozen=True, slots=True)
class Subject:
    """The caller of the explained request, as the chain will meet it."""

    headers: Mapping[str, str]
    # A key named by alias or digest: it stands in for a credential.
    named_key: KeyRecord | None = None
    # The key as an operator sees it, even when the chain refuses it.
    described: KeyRecord | None = None


def split_body(body: dict[str, Any]) -> tuple[str, Any, dict[str, Any]]:
    """The endpoint, the named key (or None) and the request body to explain.

    ``endpoint`` and ``key`` describe the explanation; everything else is
    the body the client would send.
    """
    request = dict(body)
    endpoint = request.pop("endpoint", "chat")
    if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
        raise BadRequest(
            f"Unknown endpoint {endpoint!r}: use chat, completions or embeddings",
            param="endpoint",
        )
    return ENDPOINTS[endpoint], request.pop("key", None), request


async def name_key(keys: KeyService, ref: Any, headers: Mapping[str, str]) -> Subject:
    """The subject for a key an operator names by its secret, digest or alias.

    A secret is presented to the chain as the credential, exactly as the
    real request would present it, so an unknown or retired secret gets the
    real request's 401 rather than a lookup failure.
    """
    others: CIMultiDict[str] = CIMultiDict(headers)
    for name in _CREDENTIAL_HEADERS:
        others.popall(name, None)
    if isinstance(ref, str) and ref.strip().startswith("sk-"):
        secret = ref.strip()
        if await keys.keystore.find_by_alias(secret) is None:
            others["Authorization"] = f"Bearer {secret}"
            described = await keys.keystore.find(hash_key(secret))
            return Subject(CIMultiDictProxy(others), described=described)
    record = await keys.lookup(ref)
    return Subject(CIMultiDictProxy(others), named_key=record, described=record)


def context(endpoint: str, body: dict[str, Any], subject: Subject) -> Context:
    return Context(
        endpoint,
        subject.headers,
        body,
        orjson.dumps(body),
        dry_run=True,
        named_key=subject.named_key,
    )


async def explain(
    chain: list[Policy], router: Router, ctx: Context,
    described: KeyRecord | None = None,
) -> dict[str, Any]:
    """Run the chain on a dry-run context and describe the outcome."""
    assert ctx.dry_run
    checks: list[dict[str, str]] = []
    rejection: ProxyError | None = None
    rejected_by: str | None = None
    for policy in chain:
        if rejected_by is not None:
            checks.append(_check(policy, "not_run", f"not run: {rejected_by} refused the request"))
            continue
        try:
            await policy.check(ctx)
        except ProxyError as error:
            rejection, rejected_by = error, policy.name
            checks.append(_check(policy, "rejected", error.message))
        else:
            checks.append(_check(policy, "passed", ctx.notes.get(policy.name, _NO_NOTE)))

    # Routing leaves its plan in the context even when every deployment is
    # cooling down, so the answer can say what would have been tried.
    outlook = router.explain(ctx.route, ctx.deployment) if ctx.route is not None else None
    deployment = ctx.deployment
    return {
        "allowed": rejection is None,
        "rejected_by": rejected_by,
        "error": None if rejection is None else _error(rejection),
        "key": _key(ctx, described),
        "endpoint": ctx.endpoint,
        "model_group": ctx.model_group,
        # Never the deployment's api_key: an explanation may go to a key holder.
        "deployment": None if deployment is None else {
            "id": deployment.id,
            "provider": deployment.provider,
            "api_base": deployment.api_base,
            "model": deployment.upstream_model,
        },
        "fallbacks": outlook["fallbacks"] if outlook else [],
        "cooling_down": [c["deployment"] for c in outlook["cooling_down"]] if outlook else [],
        "checks": checks,
    }


def _check(policy: Policy, outcome: str, reason: str) -> dict[str, str]:
    return {"policy": policy.name, "outcome": outcome, "reason": reason}


def _error(error: ProxyError) -> dict[str, Any]:
    # Rendered by the one renderer the real request uses, so the body is
    # the same bytes once serialised again.
    response = error_response(error)
    assert isinstance(response.body, bytes)
    return {
        "status": response.status,
        "headers": dict(error.headers),
        "body": orjson.loads(response.body),
    }


def _key(ctx: Context, described: KeyRecord | None) -> dict[str, Any] | None:
    if ctx.is_master:
        return {"key_alias": None, "key_name": None, "account_type": "master"}
    record = ctx.key or described
    if record is None:
        return None
    return {
        "key_alias": record.key_alias,
        "key_name": record.key_name,
        "account_type": record.account_type,
    }
