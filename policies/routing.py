"""Routing: the deployment that will serve the request first.

Retries and fallbacks happen later, in the relay, which asks the same
router for the next deployment; this step only decides the first one, and
changes nothing while doing so, so a dry run can run it too.
"""

from __future__ import annotations

from keystile.router import Router

from .base import Context, Policy

__all__ = ["Route"]


class Route(Policy):
    name = "routing"

    def __init__(self, router: Router) -> None:
        self.router = router

    async def check(self, ctx: Context) -> None:
        if ctx.model_group is None or ctx.model is None:
            return
        attempts = self.router.start(ctx.model_group, ctx.model, ctx.key)
        deployment = self.router.first(attempts)
        ctx.route = attempts
        if deployment is None:
            raise self.router.all_cooling(attempts)
        ctx.deployment = deployment
        note = f"deployment {deployment.id} of model group {attempts.group!r}"
        if attempts.fallback is not None:
            note += f" (fallback: every deployment of {ctx.model_group!r} is cooling down)"
        ctx.notes[self.name] = note
