"""What the router remembers about deployments, in memory, for this process.

In-flight counts (least-busy), recent time to first byte (latency-based
routing), recent failures and cooldowns, and per-minute request and token
counts (a deployment's ``rpm`` / ``tpm``).  Everything is keyed by
deployment id and read on the hot path, so every operation is a dict
lookup or two.

TODO(when a shared backend exists): several proxy processes would each keep
their own view; cooldowns and minute counters would move behind the
keystore's counter interface to be shared.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from .config import Deployment, RouterSettings

__all__ = ["RouterState"]

# Weight of the newest time-to-first-byte sample in the moving average.
_LATENCY_SMOOTHING = 0.3
_FAIL_WINDOW = 60.0


class RouterState:
    def __init__(
        self, settings: RouterSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.in_flight: dict[str, int] = {}
        self.latency: dict[str, float] = {}
        self._fails: dict[str, deque[float]] = {}
        self._cool_until: dict[str, float] = {}
        # id -> [minute, requests, tokens]
        self._minute: dict[str, list[int]] = {}

    def cooling_left(self, deployment_id: str, now: float) -> float:
        """Seconds until the deployment may be used again; 0 if it may now."""
        until = self._cool_until.get(deployment_id)
        if until is None:
            return 0.0
        if until <= now:
            del self._cool_until[deployment_id]
            return 0.0
        return until - now

    def has_room(self, deployment: Deployment, now: float) -> bool:
        """False once the deployment has used its ``rpm`` or ``tpm`` this minute."""
        if deployment.rpm is None and deployment.tpm is None:
            return True
        counts = self._minute.get(deployment.id)
        if counts is None or counts[0] != int(now // 60):
            return True
        _, requests, tokens = counts
        if deployment.rpm is not None and requests >= deployment.rpm:
            return False
        return deployment.tpm is None or tokens < deployment.tpm

    def begin(self, deployment: Deployment) -> None:
        """An attempt on the deployment starts."""
        self.in_flight[deployment.id] = self.in_flight.get(deployment.id, 0) + 1
        if deployment.rpm is not None or deployment.tpm is not None:
            self._count(deployment.id, 1, 0)

    def end(self, deployment: Deployment) -> None:
        self.in_flight[deployment.id] -= 1

    def add_tokens(self, deployment: Deployment, tokens: int) -> None:
        """Tokens the upstream reported using, for the deployment's ``tpm``."""
        if deployment.tpm is not None and tokens > 0:
            self._count(deployment.id, 0, tokens)

    def answered(self, deployment: Deployment, seconds: float) -> None:
        """The deployment answered; ``seconds`` is its time to first byte."""
        old = self.latency.get(deployment.id)
        self.latency[deployment.id] = seconds if old is None else (
            old + _LATENCY_SMOOTHING * (seconds - old)
        )

    def failed(self, deployment: Deployment, status: int | None, can_cool: bool) -> None:
        """A retryable failure: counts toward a cooldown when ``can_cool``."""
        if not can_cool or self.settings.cooldown_time <= 0:
            return
        now = self.clock()
        if status == 429:
            self._cool(deployment.id, now)
            return
        fails = self._fails.setdefault(deployment.id, deque())
        fails.append(now)
        while fails and fails[0] <= now - _FAIL_WINDOW:
            fails.popleft()
        if len(fails) >= self.settings.allowed_fails:
            self._cool(deployment.id, now)

    def _cool(self, deployment_id: str, now: float) -> None:
        self._cool_until[deployment_id] = now + self.settings.cooldown_time
        # A deployment back from its cooldown starts with a clean slate.
        self._fails.pop(deployment_id, None)

    def _count(self, deployment_id: str, requests: int, tokens: int) -> None:
        minute = int(self.clock() // 60)
        counts = self._minute.get(deployment_id)
        if counts is None or counts[0] != minute:
            self._minute[deployment_id] = [minute, requests, tokens]
        else:
            counts[1] += requests
            counts[2] += tokens
