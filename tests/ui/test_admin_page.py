"""The admin page, end to end: real Chromium, the real proxy, the real client."""

from __future__ import annotations

import openai
import pytest
from playwright.async_api import Locator, Page, expect

from ..conftest import MakeProxy, Proxy, base_config
from ..fakes import FakeUpstream
from ..test_seed import DOCUMENTED_400, MESSAGES
from .browser import chromium, open_page, screenshot, scroll_width, sign_in

HOSTILE_ALIAS = "<img src=x onerror=alert(1)>"



def row(page: Page, alias: str) -> Locator:
    return page.locator("#keys-body tr").filter(
        has=page.locator(".alias", has_text=alias)
    )


async def create_on_page(page: Page, alias: str, *, service_account: bool = True,
                         **fields: str) -> str:
    """Fill and send the create form; returns the raw key the page shows."""
    owner = "service_account" if service_account else "user"
    await page.locator(f"#create-form input[name=owner][value={owner}]").check()
    await page.locator("#create-alias").fill(alias)
    for name, value in fields.items():
        await page.locator(f"#create-form [name={name}]").fill(value)
    await page.get_by_role("button", name="Create key").click()
    await expect(page.locator("#new-key")).to_be_visible()
    return await page.locator("#new-key-value").inner_text()


async def test_seed_flow_on_the_page(make_proxy: MakeProxy, upstream: FakeUpstream) -> None:
    proxy = await make_proxy(base_config(upstream))
    async with chromium() as browser:
        page, watch = await open_page(browser, proxy.url)
        await sign_in(page, proxy.master_key)

        # Create a service-account key and read it from the page.
        await page.locator("#create-form input[name=owner][value=service_account]").check()
        await expect(page.locator("#owner-hint")).to_contain_text("user")
        raw = await create_on_page(page, "billing-batch", duration="30d")
        assert raw.startswith("sk-") and len(raw) > 40
        await expect(page.locator("#new-key")).to_contain_text("will not be shown again")
        await page.get_by_role("button", name="Copy").click()
        await expect(page.locator("#copy-result")).to_have_text("Copied to the clipboard.")
        assert await page.evaluate("navigator.clipboard.readText()") == raw
        line = row(page, "billing-batch")
        await expect(line).to_contain_text("Service account")
        await expect(line).to_contain_text("sk-..." + raw[-4:])
        await expect(line).to_contain_text("user (service accounts)")
        await expect(line).to_contain_text("Active")
        await expect(page.locator("#rules")).to_contain_text("Service-account keys must send")
        await expect(page.locator("#rules-list")).to_contain_text("user")
        await screenshot(page, ".columns", "create-form.png")
        await screenshot(page, "#keys", "keys-table.png")

        # The key works from the official client as documented.
        client = proxy.openai(raw)
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
        assert caught.value.response.content == DOCUMENTED_400
        completion = await client.chat.completions.create(
            model="gpt-3.5-turbo", messages=MESSAGES, user="test-user"
        )
        assert completion.choices[0].message.role == "assistant"

        # Once stored, the raw key leaves the page.
        await page.get_by_role("button", name="I have stored it").click()
        await expect(page.locator("#new-key")).to_be_hidden()
        assert raw not in await page.content()

        # Block: the next request is refused; unblock: accepted again.
        await page.get_by_role("button", name="Block billing-batch").click()
        await expect(line).to_contain_text("Blocked")
        with pytest.raises(openai.AuthenticationError) as refused:
            await client.chat.completions.create(
                model="gpt-3.5-turbo", messages=MESSAGES, user="test-user"
            )
        assert refused.value.status_code == 401
        assert "blocked" in refused.value.message
        await page.get_by_role("button", name="Unblock billing-batch").click()
        await expect(line).to_contain_text("Active")
        await client.chat.completions.create(
            model="gpt-3.5-turbo", messages=MESSAGES, user="test-user"
        )

        # Regenerate after confirming: the new secret is shown once and
        # the old one stops working.
        await page.get_by_role("button", name="Regenerate billing-batch").click()
        await page.locator("#confirm-ok").click()
        await expect(page.locator("#new-key-title")).to_have_text("New secret")
        new_raw = await page.locator("#new-key-value").inner_text()
        assert new_raw.startswith("sk-") and new_raw != raw
        await expect(line).to_contain_text("sk-..." + new_raw[-4:])
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(
                model="gpt-3.5-turbo", messages=MESSAGES, user="test-user"
            )
        await proxy.openai(new_raw).chat.completions.create(
            model="gpt-3.5-turbo", messages=MESSAGES, user="test-user"
        )

        # Delete asks first: cancelling keeps the key, confirming removes it.
        await page.get_by_role("button", name="Delete billing-batch").click()
        await expect(page.locator("#confirm-text")).to_contain_text("cannot be undone")
        await page.get_by_role("button", name="Cancel").click()
        await expect(line).to_have_count(1)
        await page.get_by_role("button", name="Delete billing-batch").click()
        await page.locator("#confirm-ok").click()
        await expect(line).to_have_count(0)
        await expect(page.locator("#status")).to_contain_text("Deleted billing-batch")
        with pytest.raises(openai.AuthenticationError):
            await proxy.openai(new_raw).chat.completions.create(
                model="gpt-3.5-turbo", messages=MESSAGES, user="test-user"
            )

        assert watch.errors == []
        assert watch.alerts == []


async def test_test_button_explains_allowed_and_refused(
    make_proxy: MakeProxy, upstream: FakeUpstream
) -> None:
    proxy = await make_proxy(base_config(upstream))
    await proxy.admin("/key/service-account/generate", {"key_alias": "svc-test"})
    async with chromium() as browser:
        page, watch = await open_page(browser, proxy.url)
        await sign_in(page, proxy.master_key)

        await page.get_by_role("button", name="Test svc-test").click()
        await page.locator("#test-model").fill("gpt-3.5-turbo")
        await page.locator("#test-form button[type=submit]").click()
        result = page.locator("#test-result")
        await expect(result).to_contain_text("Refused by required params")
        await expect(result).to_contain_text("HTTP 400")
        await expect(result).to_contain_text("please pass param=user")
        await expect(result).to_contain_text("svc-test")
        await screenshot(page, "#test-dialog", "test-refused.png")

        await page.locator("#test-user").fill("test-user")
        await page.locator("#test-form button[type=submit]").click()
        await expect(result).to_contain_text("Allowed")
        await expect(result).to_contain_text("gpt-3.5-turbo")
        await expect(result).to_contain_text(f"{upstream.url}/v1")
        await screenshot(page, "#test-dialog", "test-allowed.png")

        assert upstream.received == []
        assert watch.errors == []


async def test_html_in_an_alias_shows_as_text(proxy: Proxy) -> None:
    async with chromium() as browser:
        page, watch = await open_page(browser, proxy.url)
        await sign_in(page, proxy.master_key)

        await create_on_page(page, HOSTILE_ALIAS)

        alias = page.locator("#keys-body .alias")
        await expect(alias).to_have_text(HOSTILE_ALIAS)
        await expect(page.locator("#new-key-for")).to_contain_text(HOSTILE_ALIAS)
        await expect(page.locator("#status")).to_contain_text(HOSTILE_ALIAS)
        assert await page.locator("main img").count() == 0
        await page.get_by_role("button", name=f"Delete {HOSTILE_ALIAS}").click()
        await expect(page.locator("#confirm-title")).to_have_text(f"Delete {HOSTILE_ALIAS}?")
        await page.get_by_role("button", name="Cancel").click()
        assert await page.locator("img").count() == 0
        assert watch.alerts == []
        assert watch.errors == []


async def test_narrow_screen_has_no_sideways_scroll(proxy: Proxy) -> None:
    await proxy.admin("/key/service-account/generate", {
        "key_alias": "a-very-long-alias-without-any-spaces-for-the-nightly-billing-batch",
        "enforced_params": ["metadata.project", "metadata.cost_center"],
        "rpm_limit": 600, "tpm_limit": 100000, "max_parallel_requests": 8,
        "max_budget": 250.0, "budget_duration": "30d", "duration": "90d",
    })
    await proxy.admin("/key/generate", {"key_alias": "laptop", "models": ["gpt-3.5-turbo"]})
    await proxy.admin("/key/block", {"key": "laptop"})
    async with chromium() as browser:
        page, watch = await open_page(browser, proxy.url, width=375, height=812)
        assert await scroll_width(page) <= 375

        await sign_in(page, proxy.master_key)
        await expect(page.locator("#keys-body tr")).to_have_count(2)
        assert await scroll_width(page) <= 375

        await create_on_page(page, "phone-made")
        await expect(page.locator("#keys-body tr")).to_have_count(3)
        assert await scroll_width(page) <= 375
        await screenshot(page, ".columns", "narrow-create-form.png")
        await screenshot(page, "#keys", "narrow-keys-table.png")

        await page.get_by_role("button", name="Delete laptop").click()
        assert await scroll_width(page) <= 375
        await page.get_by_role("button", name="Cancel").click()
        assert watch.errors == []


async def test_wrong_master_key_is_reported(proxy: Proxy) -> None:
    virtual = await proxy.generate(key_alias="not-master")
    async with chromium() as browser:
        page, watch = await open_page(browser, proxy.url)

        await page.locator("#master-key").fill("sk-this-is-not-the-master-key-0000")
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator("#sign-in-error")).to_contain_text("Wrong master key")
        await expect(page.locator("#app")).to_be_hidden()
        assert await page.evaluate("sessionStorage.length") == 0

        await page.locator("#master-key").fill(virtual)
        await page.get_by_role("button", name="Sign in").click()
        await expect(page.locator("#sign-in-error")).to_contain_text("Not the master key")
        await expect(page.locator("#app")).to_be_hidden()

        # The right key is remembered for this tab only, across a reload.
        await sign_in(page, proxy.master_key)
        await page.reload()
        await expect(page.locator("#app")).to_be_visible()
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.locator("#sign-in")).to_be_visible()
        assert await page.evaluate("sessionStorage.length") == 0
        assert watch.errors == []


async def test_filter_by_account_type_and_alias_and_page_through(proxy: Proxy) -> None:
    for i in range(12):
        await proxy.admin("/key/service-account/generate", {"key_alias": f"svc-{i:02d}"})
    for i in range(18):
        await proxy.admin("/key/generate", {"key_alias": f"user-{i:02d}"})
    async with chromium() as browser:
        page, watch = await open_page(browser, proxy.url)
        await sign_in(page, proxy.master_key)
        rows = page.locator("#keys-body tr")

        await page.locator("#filter-size").select_option("10")
        await page.get_by_role("button", name="Filter").click()
        await expect(page.locator("#keys-summary")).to_have_text("30 keys")
        seen: list[str] = []
        for number in (1, 2, 3):
            if number > 1:
                await page.get_by_role("button", name="Next →").click()
            await expect(page.locator("#page-info")).to_have_text(f"Page {number} of 3")
            await expect(rows).to_have_count(10)
            seen += await page.locator("#keys-body .alias").all_inner_texts()
        await expect(page.get_by_role("button", name="Next →")).to_be_disabled()
        assert sorted(seen) == sorted(
            [f"svc-{i:02d}" for i in range(12)] + [f"user-{i:02d}" for i in range(18)]
        )
        await page.get_by_role("button", name="← Previous").click()
        await expect(page.locator("#page-info")).to_have_text("Page 2 of 3")

        await page.locator("#filter-type").select_option("service_account")
        await page.get_by_role("button", name="Filter").click()
        await expect(page.locator("#keys-summary")).to_have_text("12 keys (service accounts)")
        await expect(page.locator("#page-info")).to_have_text("Page 1 of 2")
        await expect(rows.filter(has_text="Service account")).to_have_count(10)

        await page.locator("#filter-type").select_option("")
        await page.locator("#filter-alias").fill("user-07")
        await page.get_by_role("button", name="Filter").click()
        await expect(rows).to_have_count(1)
        await expect(rows).to_contain_text("user-07")

        await page.locator("#filter-alias").fill("nobody")
        await page.get_by_role("button", name="Filter").click()
        await expect(rows).to_have_text("No key matches this filter.")
        assert watch.errors == []
