"""Routing: the deployment that will serve the request."""

from __future__ import annotations

from keystile.router import Router

from .base import Context, Policy

__all__ = ["Route"]


class Route(Policy):
    name = "routing"

    def __init__(self, router: Router) -> None:
        self.router = router

    async def check(self, ctx: Context) -> None:
        if ctx.model_group is None:
            return
        ctx.deployment = self.router.pick(ctx.model_group)
        ctx.notes[self.name] = f"deployment {ctx.deployment.id}"
