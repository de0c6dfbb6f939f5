"""router_settings and the routing keys of model_list: loaded and checked."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from keystile.config import ConfigError, load_config

OPENAI = {"model": "openai/gpt-4o", "api_base": "http://127.0.0.1:9/v1"}


def _load(tmp_path: Path, data: dict[str, Any]):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path, str(tmp_path / "keys.db"))


def _models(*params: dict[str, Any], name: str = "gpt-4o") -> list[dict[str, Any]]:
    return [{"model_name": name, "litellm_params": OPENAI | p} for p in params]


def test_defaults(tmp_path: Path) -> None:
    config = _load(tmp_path, {"model_list": _models({})})

    settings = config.router_settings
    assert (settings.routing_strategy, settings.num_retries, settings.timeout) == (
        "simple-shuffle", 2, 600.0)
    assert (settings.retry_after_cap, settings.allowed_fails, settings.cooldown_time) == (
        5.0, 3, 5.0)
    deployment = config.deployments[0]
    assert (deployment.timeout, deployment.stream_timeout) == (600.0, 600.0)


def test_every_key_is_read(tmp_path: Path) -> None:
    config = _load(tmp_path, {
        "model_list": _models(
            {"weight": 2, "rpm": 10, "tpm": 1000, "order": 1, "timeout": 30,
             "stream_timeout": 5},
            {},
        ) + _models({}, name="gpt-4o-mini"),
        "router_settings": {
            "routing_strategy": "least-busy", "num_retries": 4, "timeout": 60,
            "retry_after_cap": 2, "allowed_fails": 1, "cooldown_time": 9,
            "fallbacks": [{"gpt-4o": ["gpt-4o-mini"]}],
            "model_group_alias": {"gpt-4": "gpt-4o"},
        },
    })

    first, second, _ = config.deployments
    assert (first.weight, first.rpm, first.tpm, first.order) == (2.0, 10, 1000, 1)
    assert (first.timeout, first.stream_timeout) == (30.0, 5.0)
    # A deployment without its own timeout takes the router's.
    assert (second.timeout, second.stream_timeout) == (60.0, 60.0)
    settings = config.router_settings
    assert settings.fallbacks == {"gpt-4o": ("gpt-4o-mini",)}
    assert settings.model_group_alias == {"gpt-4": "gpt-4o"}
    assert (settings.num_retries, settings.allowed_fails, settings.cooldown_time) == (4, 1, 9.0)


def test_ids_are_stable_and_unique(tmp_path: Path) -> None:
    twice = _load(tmp_path, {"model_list": _models({}, {})})
    again = _load(tmp_path, {"model_list": _models({}, {})})

    ids = [d.id for d in twice.deployments]
    assert ids == [d.id for d in again.deployments]
    assert len(set(ids)) == 2


@pytest.mark.parametrize("data, problem", [
    ({"router_settings": {"routing_strategy": "round-robin"}},
     "router_settings.routing_strategy: must be one of simple-shuffle, least-busy, "
     "latency-based-routing, got 'round-robin'"),
    ({"router_settings": {"num_retries": -1}},
     "router_settings.num_retries: must not be negative"),
    ({"router_settings": {"num_retries": "two"}},
     "router_settings.num_retries: must be a number, got a string"),
    ({"router_settings": {"timeout": 0}}, "router_settings.timeout: must be positive"),
    ({"router_settings": {"allowed_fails": 0}},
     "router_settings.allowed_fails: must be at least 1"),
    ({"router_settings": {"fallbacks": [{"gpt-4o": ["nope"]}]}},
     "router_settings.fallbacks[0].gpt-4o: must list model groups without *, got 'nope'"),
    ({"router_settings": {"fallbacks": [{"nope": ["gpt-4o"]}]}},
     "router_settings.fallbacks[0].nope: is not a model group"),
    ({"router_settings": {"fallbacks": ["gpt-4o"]}},
     "router_settings.fallbacks[0]: must be a mapping"),
    ({"router_settings": {"model_group_alias": {"gpt-4": "nope"}}},
     "router_settings.model_group_alias.gpt-4: must name a model group, got 'nope'"),
    ({"model_list": _models({"rpm": -5})},
     "model_list[0].litellm_params.rpm: must not be negative"),
    ({"model_list": _models({"stream_timeout": 0})},
     "model_list[0].litellm_params.stream_timeout: must be positive"),
    ({"model_list": _models({"order": "first"})},
     "model_list[0].litellm_params.order: must be a number, got a string"),
    ({"model_list": [{"model_name": "a", "litellm_params": OPENAI, "model_info": {"id": "x"}},
                     {"model_name": "b", "litellm_params": OPENAI, "model_info": {"id": "x"}}]},
     "model_list[1].model_info.id: 'x' is used twice"),
    ({"model_list": _models({"model": "azure/prod", "api_base": "https://r.example"})},
     "model_list[0].litellm_params.api_version: is required for azure/"),
    ({"model_list": _models({"model": "azure/prod", "api_version": "2024 06"})},
     "model_list[0].litellm_params.api_version: may hold only letters"),
    ({"model_list": _models({"model": "openai/*"})},
     "model_list[0].litellm_params.model: must end with * exactly when model_name does"),
    ({"model_list": _models({}, name="open*ai/*")},
     "model_list[0].model_name: may only end with *"),
])
def test_bad_values_name_the_key(tmp_path: Path, data: dict[str, Any], problem: str) -> None:
    data = {"model_list": _models({})} | data

    with pytest.raises(ConfigError) as caught:
        _load(tmp_path, data)

    assert f"config.yaml: {problem}" in str(caught.value)
