"""Per-key limits: rpm and parallel exact under concurrency, tpm and budgets
within the in-flight bound, the 429 headers, and dry runs that count nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from keystile.errors import BadRequest, RateLimited
from keystile.state import CHAIN, KEYSTORE
from policies import Context

from .conftest import MakeProxy, Proxy, base_config
from .fakes import FakeUpstream

CHAT = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "hello"}]}
# The fake upstream's usage: 9 prompt and 12 completion tokens per answer.
PRICED_COST = 9 * 0.001 + 12 * 0.002


def priced_config(upstream: FakeUpstream) -> dict[str, Any]:
    config = base_config(upstream)
    config["model_list"][0]["model_info"] = {
        "input_cost_per_token": 0.001, "output_cost_per_token": 0.002,
    }
    return config


async def chat(proxy: Proxy, key: str, **extra: Any) -> tuple[int, Any, Any]:
    return await proxy.request("POST", "/chat/completions", key=key, json=CHAT | extra)


async def wait_for(condition: Any, deadline: float = 3.0) -> None:
    """Poll a background effect (the server noticing a hang-up) until it shows."""
    end = time.monotonic() + deadline
    while not await condition():
        assert time.monotonic() < end, "condition not met in time"
        await asyncio.sleep(0.02)


async def arrived(upstream: FakeUpstream, count: int) -> None:
    """Wait until the upstream has received ``count`` requests."""
    while True:
        upstream.request_seen.clear()
        if len(upstream.received) >= count:
            return
        await asyncio.wait_for(upstream.request_seen.wait(), 5)


async def test_rpm_limit_is_exact_under_concurrency(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate(rpm_limit=10)

    results = await asyncio.gather(*[chat(proxy, key) for _ in range(50)])

    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 40
    assert len(upstream.received) == 10
    remaining = sorted(int(h["x-ratelimit-remaining-requests"])
                       for status, _, h in results if status == 200)
    assert remaining == list(range(10))
    status, body, headers = next(r for r in results if r[0] == 429)
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["code"] == "429"
    assert "rpm_limit of 10" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-limit-requests"] == "10"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"].endswith("s")


async def test_parallel_limit_is_exact_and_released_when_requests_end(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate(max_parallel_requests=3)
    stall = asyncio.Event()
    upstream.script.stall = stall

    pending = {asyncio.create_task(chat(proxy, key)) for _ in range(20)}
    finished: set[asyncio.Task[Any]] = set()
    while len(finished) < 17:
        done, pending = await asyncio.wait(
            pending, timeout=5, return_when=asyncio.FIRST_COMPLETED
        )
        assert done, "the refused requests did not come back"
        finished |= done
    await arrived(upstream, 3)
    assert len(upstream.received) == 3
    stall.set()
    finished |= (await asyncio.wait(pending, timeout=5))[0]

    results = [task.result() for task in finished]
    assert [r[0] for r in results].count(200) == 3
    refused = [r for r in results if r[0] == 429]
    assert len(refused) == 17
    assert {r[2]["Retry-After"] for r in refused} == {"1"}
    assert "max_parallel_requests of 3" in refused[0][1]["error"]["message"]
    upstream.script.stall = None
    assert (await chat(proxy, key))[0] == 200


async def test_client_hanging_up_gives_back_its_parallel_slot(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate(max_parallel_requests=1)
    upstream.script.stall = asyncio.Event()
    upstream.request_seen.clear()
    request = asyncio.create_task(chat(proxy, key))
    await upstream.request_seen.wait()
    assert (await chat(proxy, key))[0] == 429

    request.cancel()
    upstream.script.stall.set()
    upstream.script.stall = None

    async def admitted() -> bool:
        return (await chat(proxy, key))[0] == 200

    await wait_for(admitted)


async def test_successful_answers_carry_the_rate_limit_headers(proxy: Proxy) -> None:
    key = await proxy.generate(rpm_limit=5, tpm_limit=1000)

    _, _, plain = await chat(proxy, key)
    status, _, streamed = await chat(proxy, key, stream=True)

    assert status == 200
    assert plain["x-ratelimit-limit-requests"] == "5"
    assert plain["x-ratelimit-remaining-requests"] == "4"
    assert plain["x-ratelimit-limit-tokens"] == "1000"
    assert plain["x-ratelimit-remaining-tokens"] == "1000"
    assert streamed["Content-Type"] == "text/event-stream"
    assert streamed["x-ratelimit-remaining-requests"] == "3"
    # The first answer's 21 tokens are counted by the time of the second.
    assert streamed["x-ratelimit-remaining-tokens"] == "979"
    assert streamed["x-ratelimit-reset-tokens"].endswith("s")


async def test_tpm_limit_is_passed_only_by_requests_in_flight(
    proxy: Proxy, upstream: FakeUpstream
) -> None:
    key = await proxy.generate(tpm_limit=30)
    stall = asyncio.Event()
    upstream.script.stall = stall

    batch = [asyncio.create_task(chat(proxy, key)) for _ in range(4)]
    await arrived(upstream, 4)
    stall.set()
    upstream.script.stall = None
    first = await asyncio.gather(*batch)
    status, body, headers = await chat(proxy, key)

    # Nothing was counted when the four started, so all four went through;
    # after them the 84 tokens of the last minute refuse the next one.
    assert [r[0] for r in first] == [200] * 4
    assert status == 429
    assert "tpm_limit of 30" in body["error"]["message"]
    assert "84 tokens" in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert len(upstream.received) == 4


async def test_master_key_is_exempt(proxy: Proxy) -> None:
    await proxy.generate(rpm_limit=1)

    results = [await chat(proxy, proxy.master_key) for _ in range(3)]

    assert [status for status, _, _ in results] == [200, 200, 200]
    assert "x-ratelimit-limit-requests" not in results[0][2]


async def test_key_over_budget_gets_400_before_the_upstream(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(priced_config(upstream))
    key = await proxy.generate(max_budget=0.05)

    first, second = await chat(proxy, key), await chat(proxy, key)
    status, body, _ = await chat(proxy, key)

    assert (first[0], second[0]) == (200, 200)
    assert status == 400
    assert body["error"]["type"] == "budget_exceeded"
    assert body["error"]["code"] == "400"
    assert "Max budget: 0.05" in body["error"]["message"]
    assert len(upstream.received) == 2
    info = await proxy.admin(f"/key/info?key={key}", method="GET")
    assert info["info"]["spend"] == pytest.approx(2 * PRICED_COST)
    assert info["info"]["max_budget"] == 0.05
    assert info["info"]["budget_remaining"] == 0.0


async def test_budget_resets_at_the_end_of_its_period(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(priced_config(upstream))
    key = await proxy.generate(max_budget=0.01, budget_duration="1s")
    before = (await proxy.admin(f"/key/info?key={key}", method="GET"))["info"]

    assert (await chat(proxy, key))[0] == 200
    assert (await chat(proxy, key))[1]["error"]["type"] == "budget_exceeded"

    async def admitted() -> bool:
        return (await chat(proxy, key))[0] == 200

    await wait_for(admitted)
    after = (await proxy.admin(f"/key/info?key={key}", method="GET"))["info"]
    assert after["budget_reset_at"] > before["budget_reset_at"]
    # Only the request of the new period is spent.
    assert after["spend"] == pytest.approx(PRICED_COST)

    async def written() -> bool:
        await proxy.runner.app[KEYSTORE].flush()
        record = proxy.runner.app[KEYSTORE].cached(after["token"])
        return record is not None and record.spend == pytest.approx(PRICED_COST)

    await wait_for(written)


async def test_key_info_shows_limit_usage(proxy: Proxy) -> None:
    key = await proxy.generate(rpm_limit=7, tpm_limit=500, max_parallel_requests=2)
    await chat(proxy, key)
    await chat(proxy, key)

    status, body, _ = await proxy.request("GET", "/key/info", key=key)

    assert status == 200
    assert body["info"]["limit_usage"] == {
        "rpm_limit": {"limit": 7, "used": 2, "remaining": 5},
        "tpm_limit": {"limit": 500, "used": 42, "remaining": 458},
        "max_parallel_requests": {"limit": 2, "used": 0, "remaining": 2},
    }


async def test_dry_run_counts_nothing_and_refuses_like_the_real_request(
    proxy: Proxy
) -> None:
    key = await proxy.generate(rpm_limit=1)
    app = proxy.runner.app
    record = app[KEYSTORE].cached((await proxy.admin(f"/key/info?key={key}",
                                                     method="GET"))["key"])
    limits = next(policy for policy in app[CHAIN] if policy.name == "limits")

    def dry() -> Context:
        return Context("chat/completions", {}, dict(CHAT), key=record, dry_run=True)

    for _ in range(5):
        ctx = dry()
        await limits.check(ctx)
        assert ctx.admission is None or ctx.admission.handle is None
    assert (await chat(proxy, key))[0] == 200
    with pytest.raises(RateLimited) as refused:
        await limits.check(dry())
    status, body, _ = await chat(proxy, key)

    assert status == 429
    assert refused.value.message == body["error"]["message"]


async def test_dry_run_reports_an_exceeded_budget(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(priced_config(upstream))
    key = await proxy.generate(max_budget=0.0)
    app = proxy.runner.app
    token = (await proxy.admin(f"/key/info?key={key}", method="GET"))["key"]
    limits = next(policy for policy in app[CHAIN] if policy.name == "limits")

    with pytest.raises(BadRequest) as refused:
        await limits.check(Context("chat/completions", {}, dict(CHAT),
                                   key=app[KEYSTORE].cached(token), dry_run=True))

    assert refused.value.type == "budget_exceeded"
