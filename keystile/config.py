"""Loading and validating ``config.yaml``.

The file uses the subset of LiteLLM's proxy configuration that Keystile
understands, under the same names, so that a LiteLLM user can bring their
file along.  Every key is declared once below with its type; a key we do
not know is logged once as a warning (never silently dropped), and a wrong
value stops startup with one line naming the file, the key and the problem.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULT_DATABASE_URL",
    "ROUTING_STRATEGIES",
    "Config",
    "ConfigError",
    "Deployment",
    "RouterSettings",
    "load_config",
]

logger = logging.getLogger(__name__)

DEFAULT_DATABASE_URL = "sqlite:///keystile.db"
DEFAULT_TIMEOUT = 600.0
# Seconds a usage row waits in memory before its batch is written.  Writing
# adds a few round trips to SQLite, so a crash loses a little more than this.
DEFAULT_BATCH_WRITE = 0.1
PROVIDERS = ("openai", "azure", "mock")
ROUTING_STRATEGIES = ("simple-shuffle", "least-busy", "latency-based-routing")
# Azure deployment names and API versions go into a URL as they are.
_URL_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
_ENV_PREFIX = "os.environ/"


class ConfigError(Exception):
    """A config file that cannot be used; the message is shown as is."""


@dataclass(frozen=True, slots=True)
class Deployment:
    """One upstream that serves a public model name."""

    model_name: str
    provider: str
    upstream_model: str
    api_base: str | None
    api_key: str | None = field(repr=False)
    timeout: float
    id: str
    # Seconds to the first byte of a stream; the whole call still has ``timeout``.
    stream_timeout: float = DEFAULT_TIMEOUT
    weight: float | None = None
    rpm: int | None = None
    tpm: int | None = None
    # Lower tiers are tried first; None is the tier after every numbered one.
    order: int | None = None
    api_version: str | None = None
    # Prices per token from model_info; zero when not configured.
    input_cost_per_token: float = 0.0
    output_cost_per_token: float = 0.0
    # False for servers that reject stream_options.include_usage.
    stream_usage: bool = True

    @property
    def is_wildcard(self) -> bool:
        return self.model_name.endswith("*")

    def url(self, endpoint: str) -> str:
        if self.provider == "azure":
            return (f"{self.api_base}/openai/deployments/{self.upstream_model}/"
                    f"{endpoint}?api-version={self.api_version}")
        return f"{self.api_base}/{endpoint}"

    def auth_headers(self) -> dict[str, str]:
        if not self.api_key:
            return {}
        if self.provider == "azure":
            return {"api-key": self.api_key}
        return {"Authorization": f"Bearer {self.api_key}"}


@dataclass(frozen=True, slots=True)
class RouterSettings:
    """How requests are spread over a model group's deployments and retried."""

    routing_strategy: str = "simple-shuffle"
    num_retries: int = 2
    timeout: float = DEFAULT_TIMEOUT
    retry_after_cap: float = 5.0
    allowed_fails: int = 3
    cooldown_time: float = 5.0
    # group -> the groups to try after it, in order.
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # public name -> model group.
    model_group_alias: dict[str, str] = field(default_factory=dict)
    # Aliases that work but are not listed by GET /models.
    hidden_aliases: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Config:
    path: Path
    deployments: tuple[Deployment, ...]
    master_key: str | None = field(repr=False)
    database_path: Path
    enforced_params: tuple[str, ...]
    service_account_params: tuple[str, ...]
    param_headers: dict[str, str]
    router_settings: RouterSettings = field(default_factory=RouterSettings)
    batch_write_interval: float = DEFAULT_BATCH_WRITE

    @property
    def model_names(self) -> list[str]:
        return list(dict.fromkeys(d.model_name for d in self.deployments))


# Declared keys per section: name -> accepted Python types.  The value of a
# nested section is checked by its own declaration.
_TOP = {
    "model_list": (list,),
    "general_settings": (dict,),
    "router_settings": (dict,),
    "litellm_settings": (dict,),
}
_MODEL = {"model_name": (str,), "litellm_params": (dict,), "model_info": (dict,)}
_PARAMS = {
    "model": (str,),
    "api_base": (str,),
    "api_key": (str,),
    "timeout": (int, float),
    "stream_timeout": (int, float),
    "api_version": (str,),
    "weight": (int, float),
    "rpm": (int,),
    "tpm": (int,),
    "order": (int,),
    "stream_usage": (bool,),
}
_ROUTER = {
    "routing_strategy": (str,),
    "num_retries": (int,),
    "timeout": (int, float),
    "retry_after_cap": (int, float),
    "allowed_fails": (int,),
    "cooldown_time": (int, float),
    "fallbacks": (list,),
    "model_group_alias": (dict,),
}
_MODEL_INFO: dict[str, tuple[type, ...]] = {
    "id": (str,),
    "input_cost_per_token": (int, float),
    "output_cost_per_token": (int, float),
}
_GENERAL: dict[str, tuple[type, ...]] = {
    "master_key": (str,),
    "database_url": (str,),
    "enforced_params": (list,),
    "service_account_settings": (dict,),
    "proxy_batch_write_at": (int, float),
}
_SERVICE_ACCOUNT = {"enforced_params": (list,), "param_headers": (dict,)}


class _Reader:
    """Checks one file's sections against their declarations."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: {where}: {problem}")

    def section(
        self, value: Any, where: str, known: Mapping[str, tuple[type, ...]]
    ) -> dict[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"must be a mapping, got {_kind(value)}")
        out: dict[str, Any] = {}
        for name, item in value.items():
            key = f"{where}.{name}" if where else str(name)
            if name not in known:
                logger.warning("%s: %s is not understood by Keystile; ignored",
                               self.path, key)
                continue
            if item is None:
                continue
            item = self.resolve_env(item, key)
            types = known[name]
            # bool is an int in Python; a YAML "yes" is never a timeout.
            if not isinstance(item, types) or (
                isinstance(item, bool) and bool not in types
            ):
                expected = " or ".join(dict.fromkeys(_TYPE_NAMES[t] for t in types))
                raise self.fail(key, f"must be {expected}, got {_kind(item)}")
            if isinstance(item, float) and not math.isfinite(item):
                # YAML's .nan and .inf: a timeout of NaN would mean none at all.
                raise self.fail(key, "must be a finite number")
            out[name] = item
        return out

    def resolve_env(self, value: Any, where: str) -> Any:
        if isinstance(value, str) and value.startswith(_ENV_PREFIX):
            name = value[len(_ENV_PREFIX):]
            if not name:
                raise self.fail(where, "os.environ/ must be followed by a variable name")
            if name not in os.environ:
                raise self.fail(
                    where, f"environment variable {name} is not set"
                )
            return os.environ[name]
        return value

    def names(self, value: list[Any], where: str) -> tuple[str, ...]:
        out = []
        for i, item in enumerate(value):
            item = self.resolve_env(item, f"{where}[{i}]")
            if not isinstance(item, str) or not item.strip():
                raise self.fail(f"{where}[{i}]", "must be a non-empty string")
            out.append(item.strip())
        return tuple(out)


_TYPE_NAMES = {
    str: "a string",
    int: "a number",
    float: "a number",
    list: "a list",
    dict: "a mapping",
    bool: "true or false",
}


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def load_config(path: str | Path, database_override: str | None = None) -> Config:
    """Read, resolve and validate a config file; raise ConfigError if unusable."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: byte {exc.start}: not UTF-8 text") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "file"
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ConfigError(f"{path}: {where}: {problem}") from exc

    reader = _Reader(path)
    top = reader.section(data, "", _TOP)
    general = reader.section(top.get("general_settings"), "general_settings", _GENERAL)
    router = reader.section(top.get("router_settings"), "router_settings", _ROUTER)
    # Accepted so that a LiteLLM file loads, but none of its settings (such
    # as drop_params) is implemented: each one present is warned about.
    reader.section(top.get("litellm_settings"), "litellm_settings", {})
    router_timeout = _positive(reader, router, "timeout", "router_settings", DEFAULT_TIMEOUT)
    deployments = _deployments(reader, top.get("model_list", []), router_timeout)
    router_settings = _router_settings(reader, router, router_timeout, deployments)

    master_key = general.get("master_key")
    if master_key is not None and (
        not master_key.startswith("sk-") or len(master_key) < 20
    ):
        raise reader.fail(
            "general_settings.master_key",
            "must start with sk- and be at least 20 characters",
        )

    service_account = reader.section(
        general.get("service_account_settings"),
        "general_settings.service_account_settings",
        _SERVICE_ACCOUNT,
    )
    param_headers = {}
    where = "general_settings.service_account_settings.param_headers"
    for param, header in service_account.get("param_headers", {}).items():
        header = reader.resolve_env(header, f"{where}.{param}")
        if not isinstance(header, str) or not header.strip():
            raise reader.fail(f"{where}.{param}", "must be a header name")
        param_headers[str(param)] = header.strip().lower()

    batch_write = float(general.get("proxy_batch_write_at", DEFAULT_BATCH_WRITE))
    if batch_write <= 0:
        raise reader.fail("general_settings.proxy_batch_write_at", "must be positive")

    if database_override is not None:
        database_path = Path(database_override)
    else:
        database_path = _database_path(
            reader, general.get("database_url", DEFAULT_DATABASE_URL)
        )

    return Config(
        path=path,
        deployments=deployments,
        master_key=master_key,
        database_path=database_path,
        enforced_params=reader.names(
            general.get("enforced_params", []), "general_settings.enforced_params"
        ),
        service_account_params=reader.names(
            service_account.get("enforced_params", []),
            "general_settings.service_account_settings.enforced_params",
        ),
        param_headers=param_headers,
        router_settings=router_settings,
        batch_write_interval=batch_write,
    )


def _positive(
    reader: _Reader, values: dict[str, Any], name: str, where: str, default: float
) -> float:
    value = float(values.get(name, default))
    if value <= 0:
        raise reader.fail(f"{where}.{name}", "must be positive")
    return value


def _not_negative(reader: _Reader, values: dict[str, Any], name: str, where: str) -> None:
    if name in values and values[name] < 0:
        raise reader.fail(f"{where}.{name}", "must not be negative")


def _deployments(
    reader: _Reader, entries: list[Any], default_timeout: float
) -> tuple[Deployment, ...]:
    out: list[Deployment] = []
    ids: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"model_list[{i}]"
        model = reader.section(entry, where, _MODEL)
        name = model.get("model_name")
        if not name or not name.strip():
            raise reader.fail(f"{where}.model_name", "is required")
        name = name.strip()
        if "*" in name[:-1]:
            raise reader.fail(
                f"{where}.model_name", "may only end with *, as in openai/*"
            )
        where_params = f"{where}.litellm_params"
        params = reader.section(model.get("litellm_params"), where_params, _PARAMS)
        info = reader.section(model.get("model_info"), f"{where}.model_info", _MODEL_INFO)
        target = params.get("model", "")
        provider, _, upstream_model = target.partition("/")
        if provider not in PROVIDERS or not upstream_model:
            raise reader.fail(
                f"{where_params}.model",
                "must be openai/<model> (any OpenAI-compatible server), "
                "azure/<deployment> (Azure OpenAI) "
                f"or mock/<name> (the built-in test model), got {target!r}",
            )
        if upstream_model.endswith("*") != name.endswith("*"):
            raise reader.fail(
                f"{where_params}.model",
                "must end with * exactly when model_name does (openai/* for openai/*)",
            )
        api_base = params.get("api_base")
        if provider == "openai" and api_base is None:
            api_base = "https://api.openai.com/v1"
        api_version = params.get("api_version")
        if provider == "azure":
            _azure(reader, where_params, upstream_model, api_base, api_version)
        timeout = _positive(reader, params, "timeout", where_params, default_timeout)
        stream_timeout = _positive(reader, params, "stream_timeout", where_params, timeout)
        for limit in ("weight", "rpm", "tpm"):
            _not_negative(reader, params, limit, where_params)

        deployment_id = info.get("id") or _derived_id(name, target, api_base, ids)
        if deployment_id in ids:
            raise reader.fail(
                f"{where}.model_info.id", f"{deployment_id!r} is used twice"
            )
        ids.add(deployment_id)
        prices = {}
        for price in ("input_cost_per_token", "output_cost_per_token"):
            prices[price] = float(info.get(price, 0))
            if prices[price] < 0:
                raise reader.fail(f"{where}.model_info.{price}", "must be 0 or more")
        weight = params.get("weight")
        out.append(
            Deployment(
                model_name=name,
                provider=provider,
                upstream_model=upstream_model,
                api_base=api_base.rstrip("/") if api_base else None,
                api_key=params.get("api_key"),
                timeout=timeout,
                id=deployment_id,
                stream_timeout=stream_timeout,
                weight=float(weight) if weight is not None else None,
                rpm=params.get("rpm"),
                tpm=params.get("tpm"),
                order=params.get("order"),
                api_version=api_version,
                stream_usage=params.get("stream_usage", True),
                **prices,
            )
        )
    return tuple(out)


def _azure(
    reader: _Reader, where: str, name: str, api_base: str | None, api_version: str | None
) -> None:
    if api_base is None:
        raise reader.fail(f"{where}.api_base",
                          "is required for azure/ (https://<resource>.openai.azure.com)")
    if api_version is None:
        raise reader.fail(f"{where}.api_version",
                          "is required for azure/ (such as 2024-06-01)")
    for value, what in ((name, "model"), (api_version, "api_version")):
        if not set(value) <= _URL_SAFE:
            raise reader.fail(f"{where}.{what}",
                              "may hold only letters, digits, '-', '_' and '.'")


def _derived_id(name: str, target: str, api_base: str | None, taken: set[str]) -> str:
    # Stable across restarts so that logs and headers can be compared; two
    # identical entries get the next free id in file order.
    seed = f"{name}\0{target}\0{api_base}"
    for n in range(len(taken) + 1):
        digest = hashlib.sha256(f"{seed}\0{n}".encode() if n else seed.encode())
        candidate = digest.hexdigest()[:12]
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable: one more seed than ids taken")


def _router_settings(
    reader: _Reader, values: dict[str, Any], timeout: float,
    deployments: tuple[Deployment, ...],
) -> RouterSettings:
    where = "router_settings"
    strategy = values.get("routing_strategy", "simple-shuffle")
    if strategy not in ROUTING_STRATEGIES:
        raise reader.fail(f"{where}.routing_strategy",
                          f"must be one of {', '.join(ROUTING_STRATEGIES)}, got {strategy!r}")
    for name in ("num_retries", "retry_after_cap", "cooldown_time"):
        _not_negative(reader, values, name, where)
    allowed_fails = values.get("allowed_fails", 3)
    if allowed_fails < 1:
        raise reader.fail(f"{where}.allowed_fails", "must be at least 1")
    groups = {d.model_name for d in deployments}

    aliases: dict[str, str] = {}
    hidden: set[str] = set()
    for alias, target in values.get("model_group_alias", {}).items():
        key = f"{where}.model_group_alias.{alias}"
        # LiteLLM's long form: {model: <group>, hidden: true}.
        if isinstance(target, dict):
            if target.get("hidden") is True:
                hidden.add(str(alias))
            target = target.get("model")
        if not isinstance(target, str) or target not in groups:
            raise reader.fail(key, f"must name a model group, got {target!r}")
        aliases[str(alias)] = target

    fallbacks: dict[str, tuple[str, ...]] = {}
    for i, entry in enumerate(values.get("fallbacks", [])):
        key = f"{where}.fallbacks[{i}]"
        if not isinstance(entry, dict):
            raise reader.fail(key, 'must be a mapping like {"gpt-4o": ["gpt-4o-mini"]}')
        for group, targets in entry.items():
            if group not in groups:
                raise reader.fail(f"{key}.{group}", "is not a model group")
            if not isinstance(targets, list):
                targets = [targets]
            for target in targets:
                if not isinstance(target, str) or target not in groups or (
                    target.endswith("*")
                ):
                    raise reader.fail(
                        f"{key}.{group}",
                        f"must list model groups without *, got {target!r}",
                    )
            fallbacks[group] = fallbacks.get(group, ()) + tuple(targets)

    return RouterSettings(
        routing_strategy=strategy,
        num_retries=values.get("num_retries", 2),
        timeout=timeout,
        retry_after_cap=float(values.get("retry_after_cap", 5.0)),
        allowed_fails=allowed_fails,
        cooldown_time=float(values.get("cooldown_time", 5.0)),
        fallbacks=fallbacks,
        model_group_alias=aliases,
        hidden_aliases=frozenset(hidden),
    )


def _database_path(reader: _Reader, url: str) -> Path:
    # SQLAlchemy's convention, as LiteLLM users know it: three slashes
    # then a relative path, four slashes for an absolute one.
    prefix = "sqlite:///"
    if not url.startswith(prefix) or len(url) == len(prefix):
        raise reader.fail(
            "general_settings.database_url",
            "must be sqlite:///path.db (only SQLite is supported in this version)",
        )
    path = Path(url[len(prefix):])
    if not path.is_absolute():
        path = reader.path.resolve().parent / path
    return path
