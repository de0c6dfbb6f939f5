"""Serving the admin page (headers, caching, no outside resources) and the
one route made for it, GET /admin/settings."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import keystile

from ..conftest import MakeProxy, Proxy, base_config

UI_DIR = Path(keystile.__file__).parent / "ui"
CSP = ("default-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'; object-src 'none'")


@pytest.mark.parametrize(("path", "content_type"), [
    ("/ui", "text/html"),
    ("/ui/", "text/html"),
    ("/ui/app.js", "text/javascript"),
    ("/ui/app.css", "text/css"),
    ("/ui/favicon.svg", "image/svg+xml"),
])
async def test_files_are_served_with_a_strict_policy_and_revalidation(
    proxy: Proxy, path: str, content_type: str
) -> None:
    status, body, headers = await proxy.request("GET", path)

    assert status == 200
    assert headers["Content-Type"].startswith(content_type)
    assert headers["Content-Security-Policy"] == CSP
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Cache-Control"] == "no-cache"
    assert len(body) > 100

    again, empty, _ = await proxy.request(
        "GET", path, headers={"If-None-Match": headers["ETag"]}
    )
    assert again == 304
    assert empty == b""


async def test_an_unknown_ui_file_is_a_404_envelope(proxy: Proxy) -> None:
    status, body, _ = await proxy.request("GET", "/ui/missing.js")

    assert status == 404
    assert body["error"]["code"] == "404"


def test_the_page_loads_nothing_from_outside_and_nothing_inline() -> None:
    html = (UI_DIR / "index.html").read_text(encoding="utf-8")
    script = (UI_DIR / "app.js").read_text(encoding="utf-8")
    css = (UI_DIR / "app.css").read_text(encoding="utf-8")

    references = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert references and all(ref.startswith("/ui/") for ref in references)
    assert re.findall(r"<script[^>]*>([^<]*)</script>", html) == [""]
    assert "<style" not in html and " style=" not in html
    assert re.search(r"\son[a-z]+=", html) is None
    assert "url(" not in css and "@import" not in css
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write",
                 "eval(", "new Function"):
        assert sink not in script, sink
    assert re.search(r"https?://", html + script + css) is None


async def test_settings_tell_the_page_the_rules_in_force(make_proxy: MakeProxy) -> None:
    config = base_config(None, enforced_params=["metadata.project"])
    config["general_settings"]["service_account_settings"]["param_headers"] = {
        "user": "X-End-User-Id"
    }
    proxy = await make_proxy(config)

    body = await proxy.admin("/admin/settings", method="GET")

    assert body == {
        "models": ["mock-model"],
        "enforced_params": ["metadata.project"],
        "service_account_settings": {
            "enforced_params": ["user"],
            "param_headers": {"user": "x-end-user-id"},
        },
        "durations": {
            "units": {"s": 1, "m": 60, "h": 3600, "d": 86400},
            "examples": ["30s", "15m", "12h", "30d"],
        },
        "max_page_size": 100,
    }


async def test_settings_are_for_the_master_key_only(proxy: Proxy) -> None:
    virtual = await proxy.generate()

    anonymous, body, _ = await proxy.request("GET", "/admin/settings")
    assert anonymous == 401
    assert body["error"]["type"] == "authentication_error"

    wrong, body, _ = await proxy.request("GET", "/admin/settings",
                                         key="sk-not-a-key-at-all-000000")
    assert wrong == 401

    forbidden, body, _ = await proxy.request("GET", "/admin/settings", key=virtual)
    assert forbidden == 403
    assert body["error"]["message"] == "Only the master key may call /admin/settings"
