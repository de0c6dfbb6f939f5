"""Model groups: which deployments serve a public model name."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from keystore import KeyRecord

from .config import Deployment

__all__ = ["RouteOutlook", "Router"]


@dataclass(frozen=True, slots=True)
class RouteOutlook:
    """What an explanation reports about a group besides the chosen deployment."""

    # Model groups a failed request would move on to, in the order tried.
    fallbacks: tuple[str, ...] = ()
    # Deployments of the group that are skipped for now.
    cooling_down: tuple[str, ...] = ()


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

    def explain(self, group: str) -> RouteOutlook:
        """Fallbacks and cooling-down deployments for an explanation; reads only.

        The router has neither yet, so the outlook is empty; once it keeps
        them, this is the one place an explanation learns about them.
        """
        return RouteOutlook()
