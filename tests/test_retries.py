"""Retries, fallbacks and cooldowns against fake upstreams over real HTTP."""

from __future__ import annotations

import time

import pytest

from .conftest import MakeProxy
from .fakes import Script
from .routes import chat, config, deployment

RETRIED = [408, 429, 500, 502, 503, 504]
NOT_RETRIED = [400, 401, 403, 404, 409, 422, 501]


@pytest.mark.parametrize("status", RETRIED)
async def test_a_retryable_status_is_retried(make_proxy: MakeProxy, make_upstream,
                                             status: int) -> None:
    fake = await make_upstream()
    fake.then(Script(status=status, body=b'{"error": {"message": "busy"}}'))
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")], num_retries=1))

    answer, body, headers = await chat(proxy, "gpt-4o")

    assert answer == 200, body
    assert body["object"] == "chat.completion"
    assert len(fake.received) == 2
    assert headers["x-keystile-retries"] == "1"


@pytest.mark.parametrize("status", NOT_RETRIED)
async def test_other_statuses_pass_through_at_once(make_proxy: MakeProxy, make_upstream,
                                                   status: int) -> None:
    first, second = await make_upstream(), await make_upstream()
    for fake in (first, second):
        fake.script = Script(status=status, body=b'{"error": {"message": "no", '
                             b'"type": "invalid_request_error", "param": null, '
                             b'"code": "context_length_exceeded"}}')
    proxy = await make_proxy(config(
        [deployment("gpt-4o", first, "a"), deployment("gpt-4o", second, "b"),
         deployment("gpt-4o-mini", second, "c")],
        fallbacks=[{"gpt-4o": ["gpt-4o-mini"]}],
    ))

    answer, body, headers = await chat(proxy, "gpt-4o")

    assert answer == status
    assert body["error"]["code"] == "context_length_exceeded"
    assert len(first.received) + len(second.received) == 1
    assert headers["x-keystile-retries"] == "0"


async def test_retries_move_across_deployments(make_proxy: MakeProxy, make_upstream) -> None:
    fakes = [await make_upstream() for _ in range(3)]
    for fake in fakes:
        fake.script = Script(status=503, body=b"overloaded", content_type="text/plain")
    proxy = await make_proxy(config(
        [deployment("gpt-4o", fake, f"d{i}") for i, fake in enumerate(fakes)],
        num_retries=2, allowed_fails=10,
    ))

    answer, body, headers = await chat(proxy, "gpt-4o")

    # Three attempts, one on each deployment; the last upstream answer is
    # what the client sees, in the OpenAI envelope.
    assert [len(fake.received) for fake in fakes] == [1, 1, 1]
    assert answer == 503
    assert body["error"]["message"] == "The upstream for 'gpt-4o' answered 503: overloaded"
    assert body["error"]["code"] == "503"
    assert headers["x-keystile-retries"] == "2"


@pytest.mark.parametrize("num_retries, attempts", [(0, 1), (1, 2), (3, 4)])
async def test_num_retries_bounds_the_attempts(make_proxy: MakeProxy, make_upstream,
                                               num_retries: int, attempts: int) -> None:
    fake = await make_upstream()
    fake.script = Script(status=500)
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")],
                                    num_retries=num_retries))

    answer, _, _ = await chat(proxy, "gpt-4o")

    assert answer == 500
    assert len(fake.received) == attempts


async def test_an_unreachable_deployment_is_retried_elsewhere(
    make_proxy: MakeProxy, make_upstream
) -> None:
    gone, alive = await make_upstream(), await make_upstream()
    await gone.stop()  # its port now refuses connections
    proxy = await make_proxy(config(
        [deployment("gpt-4o", gone, "gone", order=1),
         deployment("gpt-4o", alive, "alive", order=2)],
    ))

    answer, _, headers = await chat(proxy, "gpt-4o")

    assert answer == 200
    assert headers["x-keystile-deployment-id"] == "alive"
    assert headers["x-keystile-retries"] == "1"


async def test_a_timeout_is_retried_elsewhere(make_proxy: MakeProxy, make_upstream) -> None:
    slow, fast = await make_upstream(), await make_upstream()
    slow.script = Script(delay=5)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", slow, "slow", order=1, timeout=0.3),
         deployment("gpt-4o", fast, "fast", order=2)],
    ))

    answer, _, headers = await chat(proxy, "gpt-4o")

    assert answer == 200
    assert headers["x-keystile-deployment-id"] == "fast"


async def test_the_last_timeout_is_a_504(make_proxy: MakeProxy, make_upstream) -> None:
    slow = await make_upstream()
    slow.script = Script(delay=5)
    proxy = await make_proxy(config([deployment("gpt-4o", slow, "slow", timeout=0.2)],
                                    num_retries=1))

    answer, body, _ = await chat(proxy, "gpt-4o")

    assert answer == 504
    assert body["error"]["type"] == "timeout_error"
    assert len(slow.received) == 2


async def test_fallbacks_run_in_order_with_the_model_rewritten(
    make_proxy: MakeProxy, make_upstream
) -> None:
    a, b, c = await make_upstream(), await make_upstream(), await make_upstream()
    a.script = b.script = Script(status=503)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", a, "a"), deployment("gpt-4o-mini", b, "b"),
         deployment("gpt-3.5", c, "c")],
        num_retries=1, fallbacks=[{"gpt-4o": ["gpt-4o-mini", "gpt-3.5"]}],
    ))

    answer, body, headers = await chat(proxy, "gpt-4o")

    assert answer == 200
    assert (len(a.received), len(b.received), len(c.received)) == (2, 2, 1)
    assert c.received[0].json["model"] == "gpt-3.5-upstream"
    assert body["model"] == "gpt-3.5-upstream"
    assert headers["x-keystile-model-group"] == "gpt-4o"
    assert headers["x-keystile-fallback"] == "gpt-3.5"
    assert headers["x-keystile-deployment-id"] == "c"
    assert headers["x-keystile-retries"] == "4"


async def test_fallbacks_never_loop(make_proxy: MakeProxy, make_upstream) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.script = b.script = Script(status=502)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", a, "a"), deployment("gpt-4o-mini", b, "b")],
        num_retries=0, fallbacks=[{"gpt-4o": ["gpt-4o-mini"]}, {"gpt-4o-mini": ["gpt-4o"]}],
    ))

    answer, _, _ = await chat(proxy, "gpt-4o")

    assert answer == 502
    assert (len(a.received), len(b.received)) == (1, 1)


async def test_fallbacks_stay_within_the_models_of_the_key(
    make_proxy: MakeProxy, make_upstream
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.script = Script(status=503)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", a, "a"), deployment("gpt-4o-mini", b, "b")],
        num_retries=0, fallbacks=[{"gpt-4o": ["gpt-4o-mini"]}],
    ))
    key = await proxy.generate(models=["gpt-4o"])

    answer, _, _ = await chat(proxy, "gpt-4o", key=key)

    assert answer == 503
    assert b.received == []


async def test_a_failing_deployment_cools_down(make_proxy: MakeProxy, make_upstream) -> None:
    bad, good = await make_upstream(), await make_upstream()
    bad.script = Script(status=500)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", bad, "bad", weight=100), deployment("gpt-4o", good, "good")],
        allowed_fails=2, cooldown_time=60, num_retries=1,
    ))

    answers = [(await chat(proxy, "gpt-4o"))[0] for _ in range(20)]

    assert answers == [200] * 20
    # Two failures and it is left alone, although its weight makes it the
    # first choice nearly every time.
    assert len(bad.received) == 2


async def test_a_429_cools_down_at_once(make_proxy: MakeProxy, make_upstream) -> None:
    limited, good = await make_upstream(), await make_upstream()
    limited.script = Script(status=429)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", limited, "limited", order=1),
         deployment("gpt-4o", good, "good", order=2)],
        allowed_fails=100, cooldown_time=60,
    ))

    for _ in range(5):
        answer, _, _ = await chat(proxy, "gpt-4o")
        assert answer == 200

    assert len(limited.received) == 1
    assert len(good.received) == 5


async def test_all_cooling_is_a_429_without_calling_upstream(
    make_proxy: MakeProxy, make_upstream
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.script = b.script = Script(status=503)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", a, "a"), deployment("gpt-4o", b, "b")],
        allowed_fails=1, cooldown_time=30, num_retries=1,
    ))
    first, _, _ = await chat(proxy, "gpt-4o")

    answer, body, headers = await chat(proxy, "gpt-4o")

    assert first == 503
    assert answer == 429
    assert body["error"]["type"] == "rate_limit_error"
    assert "'gpt-4o'" in body["error"]["message"]
    assert 29 <= int(headers["Retry-After"]) <= 30
    assert len(a.received) + len(b.received) == 2


async def test_a_cooling_group_falls_back_without_calling_it(
    make_proxy: MakeProxy, make_upstream
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.script = Script(status=429)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", a, "a1"), deployment("gpt-4o", a, "a2"),
         deployment("gpt-4o-mini", b, "b")],
        num_retries=1, cooldown_time=30, fallbacks=[{"gpt-4o": ["gpt-4o-mini"]}],
    ))
    await chat(proxy, "gpt-4o")
    calls = len(a.received)

    answer, _, headers = await chat(proxy, "gpt-4o")

    assert answer == 200
    assert headers["x-keystile-fallback"] == "gpt-4o-mini"
    assert len(a.received) == calls == 2


async def test_a_single_deployment_never_cools_down(
    make_proxy: MakeProxy, make_upstream
) -> None:
    fake = await make_upstream()
    fake.then(Script(status=429, headers={"Retry-After": "7"}), Script(status=503))
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")],
                                    num_retries=0, allowed_fails=1, cooldown_time=60))

    results = [await chat(proxy, "gpt-4o") for _ in range(3)]

    # The upstream's own answers pass through, Retry-After included.
    assert [status for status, _, _ in results] == [429, 503, 200]
    assert results[0][2]["Retry-After"] == "7"
    assert len(fake.received) == 3


async def test_retry_after_within_the_cap_is_waited_for(
    make_proxy: MakeProxy, make_upstream
) -> None:
    fake = await make_upstream()
    fake.then(Script(status=429, headers={"Retry-After": "1"}))
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")],
                                    retry_after_cap=2))

    started = time.monotonic()
    answer, _, _ = await chat(proxy, "gpt-4o")

    assert answer == 200
    assert time.monotonic() - started >= 1.0
    assert len(fake.received) == 2


async def test_retry_after_beyond_the_cap_ends_the_retries(
    make_proxy: MakeProxy, make_upstream
) -> None:
    fake = await make_upstream()
    fake.then(Script(status=503, headers={"Retry-After": "30"}))
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")],
                                    retry_after_cap=1, num_retries=3))

    started = time.monotonic()
    answer, _, headers = await chat(proxy, "gpt-4o")

    assert answer == 503
    assert headers["Retry-After"] == "30"
    assert len(fake.received) == 1
    assert time.monotonic() - started < 1.0


async def test_retry_after_beyond_the_cap_moves_to_another_deployment(
    make_proxy: MakeProxy, make_upstream
) -> None:
    a, b = await make_upstream(), await make_upstream()
    a.script = Script(status=503, headers={"Retry-After": "30"})
    proxy = await make_proxy(config(
        [deployment("gpt-4o", a, "a", order=1), deployment("gpt-4o", b, "b", order=2)],
        retry_after_cap=1, num_retries=3, allowed_fails=10,
    ))

    started = time.monotonic()
    answer, _, headers = await chat(proxy, "gpt-4o")

    assert answer == 200
    assert headers["x-keystile-deployment-id"] == "b"
    assert len(a.received) == 1
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize("body, content_type", [
    (b"<html>Bad gateway</html>", "text/html"),
    (b'{"truncated": ', "application/json"),
    (b"[1, 2]", "application/json"),
])
async def test_a_200_that_is_not_json_is_a_502(make_proxy: MakeProxy, make_upstream,
                                               body: bytes, content_type: str) -> None:
    fake = await make_upstream()
    fake.script = Script(body=body, content_type=content_type)
    proxy = await make_proxy(config([deployment("gpt-4o", fake, "only")], num_retries=0))

    answer, error, _ = await chat(proxy, "gpt-4o")

    assert answer == 502
    assert error["error"]["type"] == "upstream_error"
    assert "not a JSON object" in error["error"]["message"]
