"""Limits: a key's budget, then its rpm, tpm and parallel limits.

The counting itself lives behind the keystore (``keystore.counters``), so
a shared backend can take it over without this policy changing.  The
master key has no limits.  A dry run checks without counting anything and
refuses with the same error the real request would get.
"""

from __future__ import annotations

from keystile.errors import BadRequest, RateLimited
from keystore import Keystore
from keystore.records import to_iso

from .base import Context, Policy

__all__ = ["Limits"]


class Limits(Policy):
    name = "limits"

    def __init__(self, keystore: Keystore) -> None:
        self.keystore = keystore

    async def check(self, ctx: Context) -> None:
        key = ctx.key
        if key is None or not key.has_limits:
            return
        counters = self.keystore.counters
        rate_limited = not (
            key.rpm_limit is None and key.tpm_limit is None
            and key.max_parallel_requests is None
        )

        if key.max_budget is not None:
            spend, reset_at = await self.keystore.spend(key)
            if spend >= key.max_budget:
                if rate_limited:
                    # The refusal still tells the client where its limits stand.
                    peek = await counters.admit(key, reserve=False)
                    ctx.response_headers = peek.headers
                resets = f"; the budget resets at {to_iso(reset_at)}" if reset_at else ""
                # LiteLLM's wording and type, which clients already match on.
                raise BadRequest(
                    f"Budget has been exceeded! Current cost: {spend:.6g}, "
                    f"Max budget: {key.max_budget:g}{resets}",
                    type="budget_exceeded",
                    headers=ctx.response_headers,
                )
            ctx.notes[self.name] = f"spend {spend:.6g} of max_budget {key.max_budget:g}"
        if not rate_limited:
            return

        admission = await counters.admit(key, reserve=not ctx.dry_run)
        ctx.response_headers = admission.headers
        if admission.refused is not None:
            raise RateLimited(
                f"Rate limit reached for key {key.key_name}: {admission.message}. "
                f"Retry after {admission.retry_after} s",
                param=admission.refused,
                headers=admission.headers,
            )
        ctx.admission = admission
        ctx.notes[self.name] = "within rpm_limit, tpm_limit and max_parallel_requests"
