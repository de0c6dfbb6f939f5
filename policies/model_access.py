"""Model access: which model groups a key may reach."""

from __future__ import annotations

from keystile.errors import BadRequest, Forbidden
from keystile.router import Router

from .base import Context, Policy

__all__ = ["ModelAccess"]


class ModelAccess(Policy):
    name = "model_access"

    def __init__(self, router: Router) -> None:
        self.router = router

    async def check(self, ctx: Context) -> None:
        if ctx.body is None:
            return
        model = ctx.body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise BadRequest(
                "The request body must name a model: 'model' is missing or not a string",
                param="model",
            )
        ctx.model = model
        key = ctx.key
        group = self.router.resolve(model, key.aliases if key else None)
        if key is not None and key.models and not (
            model in key.models or (group is not None and group in key.models)
        ):
            raise Forbidden(
                f"This key may not use model {model!r}. "
                f"Models it may use: {', '.join(self.router.visible(key))}",
                param="model",
            )
        if group is None:
            allowed = self.router.visible(key)
            raise BadRequest(
                f"Unknown model {model!r}. "
                f"Models this key may use: {', '.join(allowed) or 'none'}",
                param="model",
            )
        ctx.model_group = group
        ctx.notes[self.name] = f"{model!r} is model group {group!r}"
