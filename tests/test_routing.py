"""Spreading requests over deployments, and which names reach which group."""

from __future__ import annotations

import asyncio
import time

import pytest

from keystile.config import Deployment, RouterSettings
from keystile.router import Router

from .conftest import MakeProxy, Proxy
from .fakes import FakeUpstream, Script
from .routes import chat, config, deployment

REQUESTS = 400


async def _spread(proxy: Proxy, fakes: list[FakeUpstream], model: str = "gpt-4o") -> list[float]:
    for _ in range(REQUESTS // 50):
        answers = await asyncio.gather(*(chat(proxy, model) for _ in range(50)))
        assert {status for status, _, _ in answers} == {200}
    return [len(fake.received) / REQUESTS for fake in fakes]


@pytest.mark.parametrize("params, expected", [
    ([{"weight": 3}, {"weight": 1}], [0.75, 0.25]),
    ([{"rpm": 900}, {"rpm": 100}], [0.9, 0.1]),
    ([{}, {}], [0.5, 0.5]),
    ([{"weight": 1}, {"weight": 1, "rpm": 100000}], [0.5, 0.5]),
])
async def test_simple_shuffle_follows_weight_then_rpm(
    make_proxy: MakeProxy, make_upstream, params: list[dict], expected: list[float]
) -> None:
    fakes = [await make_upstream(), await make_upstream()]
    proxy = await make_proxy(config(
        [deployment("gpt-4o", fake, f"d{i}", **extra)
         for i, (fake, extra) in enumerate(zip(fakes, params))],
    ))

    shares = await _spread(proxy, fakes)

    # 400 draws: a standard deviation of at most 2.5 points; 7 is ~3 sigma.
    for share, want in zip(shares, expected):
        assert abs(share - want) < 0.07, shares


async def test_lower_order_tiers_come_first(make_proxy: MakeProxy, make_upstream) -> None:
    first, second, third = await make_upstream(), await make_upstream(), await make_upstream()
    proxy = await make_proxy(config([
        deployment("gpt-4o", third, "unordered"),
        deployment("gpt-4o", second, "two", order=2),
        deployment("gpt-4o", first, "one", order=1),
    ]))

    for _ in range(10):
        await chat(proxy, "gpt-4o")
    first.script = Script(status=503)
    answer, _, headers = await chat(proxy, "gpt-4o")

    assert (len(first.received), len(second.received), len(third.received)) == (11, 1, 0)
    assert answer == 200
    assert headers["x-keystile-deployment-id"] == "two"


async def test_a_deployment_past_its_rpm_is_skipped(make_proxy: MakeProxy, make_upstream) -> None:
    limited, other = await make_upstream(), await make_upstream()
    proxy = await make_proxy(config([
        deployment("gpt-4o", limited, "limited", rpm=3, weight=1000),
        deployment("gpt-4o", other, "other", weight=1),
    ]))

    minute = int(time.monotonic() // 60)
    for _ in range(10):
        assert (await chat(proxy, "gpt-4o"))[0] == 200

    if int(time.monotonic() // 60) == minute:  # the minute did not turn meanwhile
        assert len(limited.received) == 3
    assert len(limited.received) + len(other.received) == 10


async def test_a_deployment_past_its_tpm_is_skipped(make_proxy: MakeProxy, make_upstream) -> None:
    # The fake reports 21 tokens an answer: the second one passes 30.
    limited, other = await make_upstream(), await make_upstream()
    proxy = await make_proxy(config([
        deployment("gpt-4o", limited, "limited", tpm=30, order=1),
        deployment("gpt-4o", other, "other", order=2),
    ]))

    minute = int(time.monotonic() // 60)
    for _ in range(5):
        assert (await chat(proxy, "gpt-4o"))[0] == 200

    if int(time.monotonic() // 60) == minute:
        assert len(limited.received) == 2
    assert len(other.received) >= 3


async def test_a_full_group_still_answers(make_proxy: MakeProxy, make_upstream) -> None:
    fake = await make_upstream()
    proxy = await make_proxy(config([
        deployment("gpt-4o", fake, "a", rpm=1), deployment("gpt-4o", fake, "b", rpm=1),
    ]))

    answers = [(await chat(proxy, "gpt-4o"))[0] for _ in range(4)]

    # rpm chooses among deployments; it is not a limit on the client.
    assert answers == [200] * 4


async def test_least_busy_avoids_the_deployment_with_a_request_in_flight(
    make_proxy: MakeProxy, make_upstream
) -> None:
    a, b = await make_upstream(), await make_upstream()
    release = asyncio.Event()
    a.script = b.script = Script(stall=release)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", a, "a"), deployment("gpt-4o", b, "b")],
        routing_strategy="least-busy",
    ))

    first = asyncio.create_task(chat(proxy, "gpt-4o"))
    while not (a.received or b.received):
        await asyncio.wait({asyncio.ensure_future(a.request_seen.wait()),
                            asyncio.ensure_future(b.request_seen.wait())},
                           return_when=asyncio.FIRST_COMPLETED, timeout=5)
    busy, idle = (a, b) if a.received else (b, a)
    second = asyncio.create_task(chat(proxy, "gpt-4o"))
    deadline = time.monotonic() + 5
    while not idle.received and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    release.set()
    answers = await asyncio.gather(first, second)

    assert (len(busy.received), len(idle.received)) == (1, 1)
    assert [status for status, _, _ in answers] == [200, 200]


async def test_latency_based_routing_prefers_the_fast_deployment(
    make_proxy: MakeProxy, make_upstream
) -> None:
    slow, fast = await make_upstream(), await make_upstream()
    slow.script = Script(delay=0.15)
    proxy = await make_proxy(config(
        [deployment("gpt-4o", slow, "slow"), deployment("gpt-4o", fast, "fast")],
        routing_strategy="latency-based-routing",
    ))

    for _ in range(20):
        assert (await chat(proxy, "gpt-4o"))[0] == 200

    # Once both are measured the slow one is more than the buffer behind.
    assert len(slow.received) == 1
    assert len(fast.received) == 19


async def test_router_aliases_and_key_aliases(make_proxy: MakeProxy, make_upstream) -> None:
    fake = await make_upstream()
    proxy = await make_proxy(config(
        [deployment("gpt-4o", fake, "big"), deployment("gpt-4o-mini", fake, "small")],
        model_group_alias={"gpt-4": "gpt-4o",
                           "secret": {"model": "gpt-4o-mini", "hidden": True}},
    ))
    key = await proxy.generate(models=["gpt-4", "cheap"], aliases={"cheap": "gpt-4o-mini"})

    via_router = await chat(proxy, "gpt-4", key=key)
    via_key = await chat(proxy, "cheap", key=key)
    direct = await chat(proxy, "gpt-4o", key=key)
    hidden = await chat(proxy, "secret")
    _, listed, _ = await proxy.request("GET", "/models", key=key)
    _, everything, _ = await proxy.request("GET", "/models", key=proxy.master_key)

    assert via_router[0] == 200 and via_router[2]["x-keystile-model-group"] == "gpt-4o"
    assert via_key[0] == 200 and via_key[2]["x-keystile-deployment-id"] == "small"
    assert fake.received[1].json["model"] == "gpt-4o-mini-upstream"
    # The alias is allowed by name; the group itself is not on the key.
    assert direct[0] == 403
    assert hidden[0] == 200 and hidden[2]["x-keystile-model-group"] == "gpt-4o-mini"
    assert [m["id"] for m in listed["data"]] == ["gpt-4", "cheap"]
    assert [m["id"] for m in everything["data"]] == ["gpt-4o", "gpt-4o-mini", "gpt-4"]


async def test_a_key_alias_cannot_reach_a_group_the_key_may_not_use(
    make_proxy: MakeProxy, make_upstream
) -> None:
    fake = await make_upstream()
    proxy = await make_proxy(config(
        [deployment("gpt-4o", fake, "big"), deployment("gpt-4o-mini", fake, "small")],
        model_group_alias={"gpt-4": "gpt-4o"},
    ))
    key = await proxy.generate(models=["gpt-4o-mini"], aliases={"mini": "gpt-4"})

    # Neither the name sent nor the group it means is on the key; and a key
    # alias naming a router alias leads nowhere (one step, never a chain).
    status, body, _ = await chat(proxy, "gpt-4", key=key)
    chained, _, _ = await chat(proxy, "mini", key=key)

    assert status == 403
    assert body["error"]["param"] == "model"
    assert chained == 403
    assert fake.received == []


@pytest.mark.parametrize("requested, upstream_model", [
    ("openai/gpt-4o-mini", "gpt-4o-mini"),
    ("openai/ft:gpt-4o:acme:1", "ft:gpt-4o:acme:1"),
    ("openai/gpt-4o", "gpt-4o-exact"),  # an exact group wins over the wildcard
])
async def test_a_wildcard_forwards_the_matched_name(
    make_proxy: MakeProxy, make_upstream, requested: str, upstream_model: str
) -> None:
    fake = await make_upstream()
    proxy = await make_proxy(config([
        deployment("openai/*", fake, "wild", model="*"),
        deployment("openai/gpt-4o", fake, "exact", model="gpt-4o-exact"),
    ]))

    status, _, _ = await chat(proxy, requested)

    assert status == 200
    assert fake.received[0].json["model"] == upstream_model


@pytest.mark.parametrize("requested", ["openai", "openai/", "openaix/gpt-4o", "gpt-4o"])
async def test_a_wildcard_matches_only_on_its_whole_prefix(
    make_proxy: MakeProxy, make_upstream, requested: str
) -> None:
    fake = await make_upstream()
    proxy = await make_proxy(config([deployment("openai/*", fake, "wild", model="*")]))

    status, body, _ = await chat(proxy, requested)

    assert status == 400
    assert body["error"]["param"] == "model"
    assert fake.received == []


async def test_a_key_limited_to_a_wildcard_group(make_proxy: MakeProxy, make_upstream) -> None:
    fake = await make_upstream()
    proxy = await make_proxy(config([
        deployment("openai/*", fake, "wild", model="*"),
        deployment("gpt-4o", fake, "plain"),
    ]))
    key = await proxy.generate(models=["openai/*"])

    allowed = await chat(proxy, "openai/o3-mini", key=key)
    refused = await chat(proxy, "gpt-4o", key=key)
    _, listed, _ = await proxy.request("GET", "/models", key=key)

    assert (allowed[0], refused[0]) == (200, 403)
    assert [m["id"] for m in listed["data"]] == ["openai/*"]


def _deployment(id: str, **fields) -> Deployment:
    return Deployment(model_name=fields.pop("group", "g"), provider="openai",
                      upstream_model="m", api_base="http://127.0.0.1:9/v1", api_key=None,
                      timeout=600.0, id=id, **fields)


def test_explaining_a_route_changes_nothing() -> None:
    # Directly on the router: a dry run asks for the first choice and the
    # cooling deployments, and the next real request must not notice.
    settings = RouterSettings(cooldown_time=30, fallbacks={"g": ("h",)})
    router = Router((_deployment("a"), _deployment("b"), _deployment("c", group="h")),
                    settings)
    router.state.failed(router.groups["g"][0], 429, can_cool=True)
    before = (dict(router.state.in_flight), dict(router.state.latency))

    attempts = router.start("g", "g", None)
    chosen = router.first(attempts)
    explained = router.explain(attempts, chosen)

    assert chosen is not None and chosen.id == "b"
    assert explained["deployment"] == "b"
    assert explained["fallbacks"] == ["h"]
    assert [c["deployment"] for c in explained["cooling_down"]] == ["a"]
    assert (dict(router.state.in_flight), dict(router.state.latency)) == before
    assert attempts.retries == 0 and attempts.tried == set()
