"""Rate-limit counters held in this process's memory.

Keystile runs as one process, so the exact answer is cheap: a sliding log
of request times per key (rpm), token counts per second per key (tpm: a
count leaves the window with the second it was recorded in) and an
in-flight count (parallel).  A check and its reservation happen with no
``await`` in between, so no two requests can both take the last slot.

A shared backend (Redis) would implement the same ``Counters`` protocol
with a server-side script doing the same check-and-reserve in one step.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .base import Admission
from .records import KeyRecord

__all__ = ["WINDOW", "MemoryCounters"]

WINDOW = 60.0  # seconds that rpm_limit and tpm_limit count over


@dataclass(slots=True)
class _KeyCounters:
    # One entry per admitted request of the last minute; never more than
    # rpm_limit, since a request is only logged when it fits under it.
    requests: deque[float] = field(default_factory=deque)
    # Tokens per second of the last minute, as [second, count]: at most 60
    # entries however busy the key is.
    tokens: deque[list[float]] = field(default_factory=deque)
    token_sum: int = 0
    in_flight: int = 0

    def expire(self, now: float) -> None:
        start = now - WINDOW
        requests = self.requests
        while requests and requests[0] <= start:
            requests.popleft()
        tokens = self.tokens
        while tokens and tokens[0][0] <= start:
            self.token_sum -= int(tokens.popleft()[1])


def _seconds(value: float) -> int:
    return max(1, math.ceil(value))


class MemoryCounters:
    """Exact rpm, tpm and parallel counters for one process."""

    def __init__(self) -> None:
        self._keys: dict[str, _KeyCounters] = {}

    def _counters(self, token: str) -> _KeyCounters:
        counters = self._keys.get(token)
        if counters is None:
            counters = self._keys[token] = _KeyCounters()
        return counters

    async def admit(self, key: KeyRecord, *, reserve: bool = True) -> Admission:
        """Check every limit of ``key``; take a slot only if all pass and ``reserve``."""
        now = time.monotonic()
        counters = self._counters(key.token)
        counters.expire(now)
        headers: dict[str, str] = {}
        refusal: tuple[str, str, int] | None = None

        rpm, tpm, parallel = key.rpm_limit, key.tpm_limit, key.max_parallel_requests
        if parallel is not None and counters.in_flight >= parallel:
            refusal = (
                "max_parallel_requests",
                f"max_parallel_requests of {parallel} reached: "
                f"{counters.in_flight} requests of this key are in flight",
                1,
            )
        if refusal is None and rpm is not None and len(counters.requests) >= rpm:
            wait = counters.requests[0] + WINDOW - now if counters.requests else WINDOW
            refusal = (
                "rpm_limit",
                f"rpm_limit of {rpm} requests per minute reached",
                _seconds(wait),
            )
        if refusal is None and tpm is not None and counters.token_sum >= tpm:
            refusal = (
                "tpm_limit",
                f"tpm_limit of {tpm} tokens per minute reached: "
                f"{counters.token_sum} tokens in the last minute",
                _seconds(self._tokens_free_in(counters, tpm, now)),
            )

        taken = refusal is None and reserve
        if taken:
            if rpm is not None:
                counters.requests.append(now)
            if parallel is not None:
                counters.in_flight += 1
        if rpm is not None:
            # "Remaining" counts this request as made, as OpenAI's headers do.
            used = len(counters.requests) + (0 if taken or refusal else 1)
            oldest = counters.requests[0] if counters.requests else now
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(0, rpm - used))
            headers["x-ratelimit-reset-requests"] = f"{_seconds(oldest + WINDOW - now)}s"
        if tpm is not None:
            oldest = counters.tokens[0][0] if counters.tokens else now
            headers["x-ratelimit-limit-tokens"] = str(tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(0, tpm - counters.token_sum))
            headers["x-ratelimit-reset-tokens"] = f"{_seconds(oldest + WINDOW - now)}s"
        if refusal is not None:
            headers["Retry-After"] = str(refusal[2])
            return Admission(refusal[0], refusal[1], refusal[2], headers, None)
        return Admission(
            None, "", 0, headers, counters if taken and parallel is not None else None
        )

    @staticmethod
    def _tokens_free_in(counters: _KeyCounters, tpm: int, now: float) -> float:
        # The first moment enough of the logged tokens leave the window.
        remaining: float = counters.token_sum
        for moment, count in counters.tokens:
            remaining -= count
            if remaining < tpm:
                return moment + WINDOW - now
        return WINDOW

    async def release(self, admission: Admission) -> None:
        """Give back the parallel slot an admission took; safe to call once per admission."""
        handle: Any = admission.handle
        if handle is not None:
            admission.handle = None
            handle.in_flight -= 1

    async def add_tokens(self, key: KeyRecord, tokens: int) -> None:
        if key.tpm_limit is None or tokens <= 0:
            return
        counters = self._counters(key.token)
        second = float(math.floor(time.monotonic()))
        log = counters.tokens
        if log and log[-1][0] == second:
            log[-1][1] += tokens
        else:
            log.append([second, tokens])
        counters.token_sum += tokens

    async def usage(self, key: KeyRecord) -> dict[str, Any]:
        """Current use of each limit, for /key/info."""
        now = time.monotonic()
        counters = self._counters(key.token)
        counters.expire(now)
        return {
            "requests_last_minute": len(counters.requests),
            "tokens_last_minute": counters.token_sum,
            "requests_in_flight": counters.in_flight,
        }

    def rename(self, old: str, new: str) -> None:
        """A regenerated key keeps its counters under its new digest."""
        counters = self._keys.pop(old, None)
        # After a regenerate by another process the new digest may already
        # count requests of its own; those stay (admissions in flight keep
        # their own handle either way).
        if counters is not None and new not in self._keys:
            self._keys[new] = counters
