"""The one interface every policy shares, and the per-request context.

A policy looks at the request through the context and either returns
(possibly filling in more of the context for the policies after it) or
raises one of the proxy's errors.  There is no third outcome.

A policy that meets a credential or a request it does not handle returns
and lets the next policy decide; one that handles it and finds it wrong
raises.  Policies take the context rather than the HTTP request so the same
chain can run as a dry run (an explanation) with no HTTP request at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from keystore import KeyRecord

__all__ = ["Context", "Policy"]


@dataclass(slots=True)
class Context:
    """What the chain knows about one request, filled in as it goes."""

    endpoint: str
    headers: Mapping[str, str]
    body: dict[str, Any] | None = None
    raw_body: bytes = b""
    # Set by authentication: exactly one of these describes the caller.
    key: KeyRecord | None = None
    is_master: bool = False
    # Set by model access and routing.
    model: str | None = None
    model_group: str | None = None
    deployment: Any = None
    # Routing's record of this request's attempts (keystile.router.Attempts).
    route: Any = None
    # Body fields the proxy must write before forwarding (name -> value,
    # dotted names for nested objects).
    body_changes: dict[str, Any] = field(default_factory=dict)
    # A dry run (an explanation) must not consume anything.
    dry_run: bool = False
    # Only in a dry run: a key named by alias or digest, standing in for a
    # credential the explanation does not have (only its digest is stored).
    named_key: KeyRecord | None = None
    # Notes a policy leaves for an explanation of the outcome.
    notes: dict[str, str] = field(default_factory=dict)
    # Set by the limits policy: headers every response to this request
    # carries, and the slot the handler gives back when the request ends.
    response_headers: dict[str, str] | None = None
    admission: Any = None


class Policy:
    """One step of the chain; subclasses implement ``check``."""

    name: ClassVar[str] = "policy"

    async def check(self, ctx: Context) -> None:
        """Return to let the request go on, or raise a ProxyError."""
        raise NotImplementedError
