"""Building configs with several deployments, and calling the proxy with them."""

from __future__ import annotations

from typing import Any

from .conftest import MASTER_KEY, Proxy
from .fakes import FakeUpstream

MESSAGES = [{"role": "user", "content": "hello"}]


def deployment(name: str, fake: FakeUpstream, id: str, *, model: str | None = None,
               **params: Any) -> dict[str, Any]:
    """One model_list entry pointing at a fake; ``id`` is its model_info.id."""
    return {
        "model_name": name,
        "litellm_params": {
            "model": f"openai/{model or name + '-upstream'}",
            "api_base": f"{fake.url}/v1",
            "api_key": f"sk-upstream-{id}",
        } | params,
        "model_info": {"id": id},
    }


def config(models: list[dict[str, Any]], **router_settings: Any) -> dict[str, Any]:
    return {
        "model_list": models,
        "general_settings": {"master_key": MASTER_KEY},
        "router_settings": router_settings,
    }


async def chat(proxy: Proxy, model: str, *, key: str = MASTER_KEY, stream: bool = False,
               headers: dict[str, str] | None = None) -> tuple[int, Any, Any]:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES}
    if stream:
        body["stream"] = True
    return await proxy.request("POST", "/chat/completions", key=key, json=body,
                               headers=headers)


async def raw_stream(proxy: Proxy, model: str) -> tuple[int, bytes, Any]:
    """A stream request's status, its exact bytes and headers."""
    body = {"model": model, "messages": MESSAGES, "stream": True}
    async with proxy.session.post(
        proxy.url + "/chat/completions", json=body,
        headers={"Authorization": f"Bearer {MASTER_KEY}"},
    ) as response:
        return response.status, await response.read(), response.headers
