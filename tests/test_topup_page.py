"""The usage page's top-up box in a real headless Chromium: a code bought from the shop is
redeemed onto the key, and the page and the billing endpoints show it at once."""
import json
import re

from playwright.async_api import expect
from tornado.httpclient import AsyncHTTPClient

from tests import test_usage_page
from tests.conservation import assert_conserved, settled
from tests.helpers import TEST_KEY
from tests.test_usage_page import ADMIN, ARTIFACTS, browser, number

page_env = test_usage_page.page_env  # the usage page's relay (a fixture), with the shop's site settings


async def admin_codes(url, quota, count):
    resp = await AsyncHTTPClient().fetch(url + "/admin/codes", method="POST",
                                         headers={"Authorization": f"Bearer {ADMIN}"},
                                         body=json.dumps({"quota": quota, "count": count, "note": "page"}))
    return json.loads(resp.body)["codes"]


async def granted_by_billing(url):
    resp = await AsyncHTTPClient().fetch(url + "/v1/dashboard/billing/subscription",
                                         headers={"Authorization": f"Bearer {TEST_KEY}"})
    return json.loads(resp.body)["hard_limit_usd"]


async def test_a_code_redeemed_on_the_page_raises_the_balance_at_once(page_env):
    url, store, services = page_env
    code, spare = await admin_codes(url, 123_456, 2)
    ARTIFACTS.mkdir(exist_ok=True)
    pw, b = await browser()
    try:
        page = await b.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
        await page.goto(url + "/usage")
        await page.fill("input[name=key]", TEST_KEY)
        await page.click("#key-form button[type=submit]")
        await page.wait_for_selector("#result", state="visible")
        assert await page.inner_text("#topup-form label") == "充值"
        before_granted, before_balance = number(await page.inner_text("#granted")), \
            number(await page.inner_text("#balance"))
        assert before_granted == await granted_by_billing(url) == 2_000_000
        await page.fill("input[name=code]", code)
        await page.click("#topup-form button[type=submit]")
        await page.wait_for_selector("#topup-message.ok", state="visible")
        assert "123,456" in await page.inner_text("#topup-message")
        assert number(await page.inner_text("#granted")) == before_granted + 123_456
        assert number(await page.inner_text("#balance")) == before_balance + 123_456
        assert await granted_by_billing(url) == before_granted + 123_456, "the billing endpoints agree at once"
        assert await page.input_value("input[name=code]") == "", "the used code leaves the field"
        assert code not in page.url and TEST_KEY not in page.url
        await page.screenshot(path=str(ARTIFACTS / "usage-topup.png"), full_page=True)
        # The same code again: refused, and said so; the balance does not move.
        await page.fill("input[name=code]", code)
        await page.click("#topup-form button[type=submit]")
        await expect(page.locator("#topup-message")).to_contain_text("已被使用")
        assert number(await page.inner_text("#granted")) == before_granted + 123_456
        await page.fill("input[name=code]", "rc-" + "Z" * 32)
        await page.click("#topup-form button[type=submit]")
        await expect(page.locator("#topup-message")).to_contain_text("无效")
        # In English.
        await page.click("#lang")
        assert await page.inner_text("#topup-form label") == "Top up"
        await page.fill("input[name=code]", spare)
        await page.click("#topup-form button[type=submit]")
        await expect(page.locator("#topup-message")).to_have_text(re.compile(r"^Done"))
        assert number(await page.inner_text("#granted")) == before_granted + 2 * 123_456
    finally:
        await b.close()
        await pw.stop()
    assert (ARTIFACTS / "usage-topup.png").stat().st_size > 10_000
    await settled(store, services)
    await assert_conserved(store)


async def test_the_top_up_box_without_script_never_puts_the_code_in_a_url(page_env):
    url, store, services = page_env
    resp = await AsyncHTTPClient().fetch(url + "/usage")
    html = resp.body.decode()
    assert 'id="topup-form" method="post" action="/usage"' in html and 'src="/usage/static/topup.js"' in html
    js = await AsyncHTTPClient().fetch(url + "/usage/static/topup.js")
    assert js.headers["Content-Type"].startswith("application/javascript")
