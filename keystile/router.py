"""Model groups: which deployments serve a public model name."""

from __future__ import annotations

import random
from collections.abc import Mapping

from keystore import KeyRecord

from .config import Deployment

__all__ = ["Router"]


class Router:
    def __init__(self, deployments: tuple[Deployment, ...]) -> None:
        self.groups: dict[str, list[Deployment]] = {}
        for deployment in deployments:
            self.groups.setdefault(deployment.model_name, []).append(deployment)

    def resolve(self, model: str, aliases: Mapping[str, str] | None) -> str | None:
        """The model group a requested name means, or None if none."""
        if aliases and model in aliases:
            return aliases[model] if aliases[model] in self.groups else None
        return model if model in self.groups else None

    def visible(self, key: KeyRecord | None) -> list[str]:
        """The names a caller may use, as ``GET /models`` lists them."""
        names = list(self.groups)
        if key is not None:
            names += [alias for alias, group in key.aliases.items() if group in self.groups]
            if key.models:
                names = [
                    name for name in names
                    if name in key.models or self.resolve(name, key.aliases) in key.models
                ]
        return list(dict.fromkeys(names))

    def pick(self, group: str) -> Deployment:
        deployments = self.groups[group]
        if len(deployments) == 1:
            return deployments[0]
        return random.choice(deployments)
