"""Model groups: which deployment serves a request, and which one is next.

The routing policy asks for a request's first choice; when an attempt
fails, the relay asks for the next one.  Choosing never changes the
router's state, so a dry run can ask the same questions; only the relay
records what happened (``state``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from keystore import KeyRecord

from .config import Deployment, RouterSettings
from .errors import RateLimited
from .routestate import RouterState

__all__ = ["Attempts", "Router"]

# Jittered backoff before a retry: up to 25 ms, 50 ms, 100 ms ... never
# more than half a second.
_BACKOFF_BASE = 0.025
_BACKOFF_CAP = 0.5
# Latency-based routing picks at random among deployments within this
# fraction of the fastest, so the fastest does not take every request.
_LATENCY_BUFFER = 0.1
_LAST_TIER = math.inf


@dataclass(slots=True)
class Attempts:
    """One request's way through its model groups; only that request's."""

    model: str
    # The group the request resolved to, then its fallbacks, in order.
    groups: tuple[str, ...]
    group_index: int = 0
    tries_in_group: int = 0
    # Attempts made after the first, in any group.
    retries: int = 0
    tried: set[str] = field(default_factory=set)
    # Not to be tried again by this request (a Retry-After beyond the cap).
    barred: set[str] = field(default_factory=set)

    @property
    def group(self) -> str:
        return self.groups[self.group_index]

    @property
    def fallback(self) -> str | None:
        """The fallback group now in use, or None while on the first group."""
        return self.groups[self.group_index] if self.group_index else None


class Router:
    def __init__(
        self,
        deployments: tuple[Deployment, ...],
        settings: RouterSettings | None = None,
        state: RouterState | None = None,
    ) -> None:
        self.settings = settings or RouterSettings()
        self.state = state or RouterState(self.settings)
        self.groups: dict[str, list[Deployment]] = {}
        for deployment in deployments:
            self.groups.setdefault(deployment.model_name, []).append(deployment)
        self.aliases = self.settings.model_group_alias
        # Longest prefix first: openai/gpt-* wins over openai/*.
        self._wildcards = sorted(
            ((name[:-1], name) for name in self.groups if name.endswith("*")),
            key=lambda item: -len(item[0]),
        )
        self._chains = {group: self._chain(group) for group in self.groups}

    def _chain(self, group: str) -> tuple[str, ...]:
        # Fallbacks of fallbacks are followed in order; a group already in
        # the chain is never added again, so no configuration can loop.
        chain = [group]
        for current in chain:
            for target in self.settings.fallbacks.get(current, ()):
                if target not in chain:
                    chain.append(target)
        return tuple(chain)

    def resolve(self, model: str, aliases: Mapping[str, str] | None) -> str | None:
        """The model group a requested name means, or None if none.

        One step, in a fixed order: the key's aliases, a group's own name,
        the router's aliases, then the longest matching wildcard.  An alias
        never leads to another alias.
        """
        if aliases and model in aliases:
            target = aliases[model]
            return target if target in self.groups and not target.endswith("*") else None
        if model in self.groups:
            # A wildcard's own name is a pattern, not a model to send on.
            return None if model.endswith("*") else model
        group = self.aliases.get(model)
        if group is not None:
            return group
        for prefix, name in self._wildcards:
            if model.startswith(prefix) and len(model) > len(prefix):
                return name
        return None

    def visible(self, key: KeyRecord | None) -> list[str]:
        """The names a caller may use, as ``GET /models`` lists them."""
        names = list(self.groups)
        names += [a for a in self.aliases if a not in self.settings.hidden_aliases]
        if key is not None:
            names += [alias for alias, group in key.aliases.items() if group in self.groups]
            if key.models:
                names = [
                    name for name in names
                    if name in key.models or self.resolve(name, key.aliases) in key.models
                ]
        return list(dict.fromkeys(names))

    def start(self, group: str, model: str, key: KeyRecord | None) -> Attempts:
        """A request's attempts, before the first: the group and its fallbacks."""
        chain = self._chains[group]
        if key is not None and key.models and len(chain) > 1:
            # A fallback is a way into a group like any other: a key that
            # may not use the group does not get there by a failure.
            chain = (group,) + tuple(g for g in chain[1:] if g in key.models)
        return Attempts(model=model, groups=chain)

    def first(self, attempts: Attempts) -> Deployment | None:
        """The first choice; moves on to a fallback when a whole group cools down."""
        for index in range(attempts.group_index, len(attempts.groups)):
            deployment = self._pick(attempts.groups[index], attempts)
            if deployment is not None:
                attempts.group_index = index
                return self._target(deployment, attempts.model)
        return None

    def next(
        self,
        attempts: Attempts,
        failed: Deployment,
        status: int | None,
        retry_after: float | None,
    ) -> tuple[Deployment | None, float]:
        """Record a retryable failure; the next deployment and the wait before it.

        None when retries and fallbacks are spent: the last failure is then
        the answer.
        """
        group = self.groups[failed.model_name]
        self.state.failed(failed, status, can_cool=len(group) > 1)
        attempts.tried.add(failed.id)
        cap = self.settings.retry_after_cap
        if retry_after is not None and retry_after > cap:
            attempts.barred.add(failed.id)
        attempts.tries_in_group += 1

        if attempts.tries_in_group <= self.settings.num_retries:
            deployment = self._pick(attempts.group, attempts)
            if deployment is not None:
                attempts.retries += 1
                wait = _backoff(attempts.tries_in_group)
                if deployment.id == failed.id and retry_after is not None:
                    wait = max(wait, retry_after)
                return self._target(deployment, attempts.model), wait

        for index in range(attempts.group_index + 1, len(attempts.groups)):
            deployment = self._pick(attempts.groups[index], attempts)
            if deployment is not None:
                attempts.group_index = index
                attempts.tries_in_group = 0
                attempts.retries += 1
                return self._target(deployment, attempts.model), 0.0
        return None, 0.0

    def broke(self, deployment: Deployment) -> None:
        """A stream failed after its first bytes: too late to retry, not to count."""
        can_cool = len(self.groups[deployment.model_name]) > 1
        self.state.failed(deployment, None, can_cool=can_cool)

    def cooling(self, groups: tuple[str, ...]) -> list[tuple[Deployment, float]]:
        """Deployments of these groups that are cooling down, with seconds left."""
        now = self.state.clock()
        out = []
        for group in groups:
            for deployment in self.groups[group]:
                left = self.state.cooling_left(deployment.id, now)
                if left > 0:
                    out.append((deployment, left))
        return out

    def all_cooling(self, attempts: Attempts) -> RateLimited:
        """The answer when every deployment the request could use cools down."""
        cooling = self.cooling(attempts.groups)
        seconds = min((left for _, left in cooling), default=1.0)
        retry_after = max(1, math.ceil(seconds))
        return RateLimited(
            f"Every deployment of model group {attempts.groups[0]!r} is cooling down "
            f"after failures; try again in {retry_after} s",
            type="rate_limit_error",
            headers={"Retry-After": str(retry_after)},
        )

    def explain(self, attempts: Attempts, chosen: Deployment | None) -> dict[str, Any]:
        """What routing decided, for a dry run; changes nothing."""
        return {
            "model_group": attempts.groups[0],
            "deployment": chosen.id if chosen else None,
            "served_by_group": attempts.group if chosen else None,
            "fallbacks": list(attempts.groups[1:]),
            "cooling_down": [
                {"deployment": d.id, "model_group": d.model_name,
                 "seconds_left": round(left, 3)}
                for d, left in self.cooling(attempts.groups)
            ],
        }

    def _pick(self, group: str, attempts: Attempts) -> Deployment | None:
        deployments = self.groups[group]
        state = self.state
        now = state.clock()
        if len(deployments) == 1:
            # Nothing to switch to: the one deployment never cools down.
            only = deployments[0]
            return None if only.id in attempts.barred else only

        usable = [
            d for d in deployments
            if d.id not in attempts.barred and state.cooling_left(d.id, now) == 0
        ]
        # Another deployment first; one that failed this request only when
        # nothing else is left.
        untried = [d for d in usable if d.id not in attempts.tried]
        pool = untried or usable
        if not pool:
            return None
        with_room = [d for d in pool if state.has_room(d, now)]
        pool = with_room or pool
        tier = min(_tier(d) for d in pool)
        pool = [d for d in pool if _tier(d) == tier]
        if len(pool) == 1:
            return pool[0]
        return self._strategy(pool)

    def _strategy(self, pool: list[Deployment]) -> Deployment:
        strategy = self.settings.routing_strategy
        if strategy == "least-busy":
            in_flight = self.state.in_flight
            fewest = min(in_flight.get(d.id, 0) for d in pool)
            return random.choice([d for d in pool if in_flight.get(d.id, 0) == fewest])
        if strategy == "latency-based-routing":
            latency = self.state.latency
            # Not yet measured counts as fastest, so every one gets measured.
            fastest = min(latency.get(d.id, 0.0) for d in pool)
            limit = fastest * (1 + _LATENCY_BUFFER)
            return random.choice([d for d in pool if latency.get(d.id, 0.0) <= limit])
        return random.choices(pool, weights=_weights(pool))[0]

    def _target(self, deployment: Deployment, model: str) -> Deployment:
        if not deployment.is_wildcard:
            return deployment
        # The part of the requested name the * matched goes upstream.
        prefix = deployment.model_name[:-1]
        star = model.removeprefix(prefix)
        return replace(deployment, upstream_model=deployment.upstream_model[:-1] + star)


def _tier(deployment: Deployment) -> float:
    return _LAST_TIER if deployment.order is None else deployment.order


def _weights(pool: list[Deployment]) -> list[float]:
    weights = [1.0] * len(pool)
    if any(d.weight is not None for d in pool):
        weights = [1.0 if d.weight is None else d.weight for d in pool]
    elif rpms := [d.rpm for d in pool if d.rpm is not None]:
        mean = sum(rpms) / len(rpms)
        weights = [float(mean if d.rpm is None else d.rpm) for d in pool]
    # All zero says nothing about a preference: share alike.
    return weights if sum(weights) > 0 else [1.0] * len(pool)


def _backoff(retry: int) -> float:
    return random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (retry - 1)))
