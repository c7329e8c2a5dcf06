"""The key holder's page in a real headless Chromium (Debian's), driven by Playwright."""
import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import tornado.web
from tornado.httpclient import AsyncHTTPClient

from relay.keys import hash_key
from tests.conservation import settled
from tests.helpers import PRICING, TEST_KEY, add_key, mock_store, serve, start_fake, unused_port

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
               "--disable-component-update", "--disable-sync"]
ADMIN = "admin-token-usage-page"


def site_config(fake) -> str:
    return f"""
upstreams:
  - {{name: primary, base_url: '{fake.base_url}', keys: [sk-page-1]}}
model_map: {{gpt-3.5-turbo: gpt-3.5-turbo-1106}}
site:
  primary_host: api.example.com
  backup_host: api-backup.example.net
  usage_host: usage.example.com
  shop_url: https://shop.example.com/relay
{PRICING}"""


@pytest.fixture
def page_env(io_loop):
    fake = start_fake()
    store = mock_store()
    io_loop.run_sync(lambda: add_key(store, quota=2_000_000))
    url, server, services = io_loop.run_sync(lambda: serve(site_config(fake), store, admin_token=ADMIN))
    yield url, store, services
    server.stop()
    io_loop.run_sync(services.close)
    fake.stop()


async def browser():
    assert shutil.which("chromium") or Path(CHROMIUM).exists(), "Debian's chromium is required (.ci/run installs it)"
    from playwright.async_api import async_playwright
    pw = await async_playwright().start()
    b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
    return pw, b


async def make_traffic(url, store, services):
    c = AsyncHTTPClient()
    for model, stream in (("gpt-4", False), ("gpt-4", True), ("gpt-3.5-turbo", False), ("gpt-3.5-turbo", True)):
        body = json.dumps({"model": model, "stream": stream, "messages": [{"role": "user", "content": "Hi"}]})
        await c.fetch(url + "/v1/chat/completions", method="POST", body=body,
                      headers={"Authorization": f"Bearer {TEST_KEY}"})
    await settled(store, services)
    # Usage on earlier days, as the settlement would have counted it then.
    earlier = {(dt.datetime.now(dt.UTC).date() - dt.timedelta(days=d)).isoformat(): cost
               for d, cost in ((3, 1200), (10, 45))}
    await store.keys.update_one({"_id": hash_key(TEST_KEY)}, {"$inc": {
        **{f"days.{day}.cost": c for day, c in earlier.items()}, **{f"days.{day}.requests": 1 for day in earlier},
        "used": sum(earlier.values()), "balance": -sum(earlier.values())}})


async def api(url, path, headers=None):
    resp = await AsyncHTTPClient().fetch(url + path, headers=headers or {"Authorization": f"Bearer {TEST_KEY}"})
    return json.loads(resp.body)


def number(text: str) -> int:
    return int(text.replace(",", "").strip())


async def test_page_shows_what_the_billing_api_says(page_env):
    url, store, services = page_env
    await make_traffic(url, store, services)
    today = dt.datetime.now(dt.UTC).date()
    sub = await api(url, "/v1/dashboard/billing/subscription")
    usage = await api(url, f"/v1/dashboard/billing/usage?start_date={today - dt.timedelta(days=40)}"
                           f"&end_date={today + dt.timedelta(days=1)}")
    view = await api(url, f"/admin/keys/{TEST_KEY}", {"Authorization": f"Bearer {ADMIN}"})
    ARTIFACTS.mkdir(exist_ok=True)
    pw, b = await browser()
    try:
        page = await b.new_page(viewport={"width": 1280, "height": 900}, locale="zh-CN")
        await page.goto(url + "/usage")
        assert await page.locator("h1").inner_text() == "用量查询", "Chinese first"
        await page.fill("input[name=key]", TEST_KEY)
        await page.click("button[type=submit]")
        await page.wait_for_selector("#result", state="visible")
        assert "key=" not in page.url and TEST_KEY not in page.url
        assert number(await page.inner_text("#granted")) == sub["hard_limit_usd"] == 2_000_000
        assert number(await page.inner_text("#used")) == usage["total_usage"] // 100 == view["used"]
        # What is left, as the billing endpoints put it (granted - used).
        assert number(await page.inner_text("#balance")) == view["available"] == 2_000_000 - view["used"]
        # The per-day table is open without a click.
        assert await page.locator("#days tbody tr").first.is_visible()
        rows = {await r.get_attribute("data-day"): number(await r.locator("td").nth(1).inner_text())
                for r in await page.locator("#days tbody tr").all()}
        billed = {dt.datetime.fromtimestamp(d["timestamp"], dt.UTC).date().isoformat():
                  d["line_items"][0]["cost"] // 100 for d in usage["daily_costs"]}
        assert {day: cost for day, cost in rows.items() if cost} == billed and len(billed) == 3
        assert await page.locator("#chart rect.bar").count() == await page.locator("#chart g.day").count() == 30
        await check_chart_axes_and_values(page, billed, "额度")
        recent = await page.locator("#recent tbody tr").count()
        assert recent == 4
        # The name the client asked for, and the one served where they differ.
        assert "gpt-3.5-turbo → gpt-3.5-turbo-1106" in await page.inner_text("#recent")
        assert "gpt-4 → " not in await page.inner_text("#recent")
        # The unit note and the configured prices (from the summary API) beside it.
        summary = await api(url, "/usage/api/summary")
        assert summary["prices"][:2] == [
            {"model": "gpt-3.5-turbo", "served_model": "gpt-3.5-turbo-1106", "input": 666.67, "output": 1333.33},
            {"model": "gpt-4", "served_model": "gpt-4", "input": 20000, "output": 40000}]
        prices = [[await c.inner_text() for c in await r.locator("td").all()]
                  for r in await page.locator("#prices tbody tr").all()]
        assert prices == [["gpt-3.5-turbo → gpt-3.5-turbo-1106", "666.67", "1,333.33"],
                          ["gpt-4", "20,000", "40,000"]]
        assert "初代 gpt-3.5-turbo（4k）" in await page.inner_text("#result .hint")
        assert "gpt-4" in await page.inner_text("#speed") and "ms" in await page.inner_text("#speed")
        await page.wait_for_function("document.getElementById('rtt').textContent.endsWith('ms')")
        snippets = await page.inner_text("#snippet-list")
        for expected in ("https://api.example.com/openai/v1", "https://api.example.com/v1",
                         "https://api-backup.example.net/v1/chat/completions"):
            assert expected in snippets
        assert await page.get_attribute("#shop-link", "href") == "https://shop.example.com/relay"
        assert "gpt-3.5" in await page.inner_text("#messages")
        await page.screenshot(path=str(ARTIFACTS / "usage-desktop.png"), full_page=True)
        await page.click("#lang")
        assert await page.locator("h1").inner_text() == "Usage"
        assert number(await page.inner_text("#balance")) == view["available"]
        note = await page.inner_text("#result .hint")
        assert "1 unit = the price of 1 input token of the original gpt-3.5-turbo (4k), $0.0015 per 1K tokens" \
            in note, note
        await check_chart_axes_and_values(page, billed, "units")
        phone = await b.new_page(viewport={"width": 390, "height": 844}, locale="en-US", is_mobile=True)
        await phone.goto(url + "/usage")
        assert await phone.locator("h1").inner_text() == "Usage", "English for an English browser"
        await phone.fill("input[name=key]", TEST_KEY)
        await phone.click("button[type=submit]")
        await phone.wait_for_selector("#result", state="visible")
        overflow = await phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, "fits a phone-sized screen"
        await phone.screenshot(path=str(ARTIFACTS / "usage-phone.png"), full_page=True)
    finally:
        await b.close()
        await pw.stop()
    for name in ("usage-desktop.png", "usage-phone.png"):
        assert (ARTIFACTS / name).stat().st_size > 10_000


async def check_chart_axes_and_values(page, billed: dict[str, int], unit: str) -> None:
    """Axis labels (the highest day's units, the first and last day), and each day's value on
    hover: the line under the chart, the bar's tooltip (title) and its accessible name."""
    days = sorted([await g.get_attribute("data-day") for g in await page.locator("#chart g.day").all()])
    assert number(await page.inner_text("#chart-max")) == max(billed.values())
    assert await page.inner_text("#chart-first") == days[0][5:] and await page.inner_text("#chart-last") == days[-1][5:]
    assert unit in await page.inner_text("#chart-box figcaption")
    for day, cost in billed.items():
        bar = page.locator(f'#chart g.day[data-day="{day}"]')
        await bar.hover()
        shown = await page.inner_text("#chart-value")
        assert day in shown and f"{cost:,}" in shown and unit in shown, shown
        assert await bar.locator("title").text_content() == shown == await bar.get_attribute("aria-label")
    quiet = next(d for d in days if d not in billed)  # a day without requests can be hovered too
    await page.locator(f'#chart g.day[data-day="{quiet}"]').hover()
    assert quiet in await page.inner_text("#chart-value")


async def test_an_overdrawn_key_shows_0_available_not_a_negative_balance(page_env):
    url, store, services = page_env
    key = "ak-overdrawn" + "0" * 32
    await add_key(store, key=key, quota=1000)
    # A request charged 50 more than was left, as the quota rules allow (docs/quota.md).
    await store.keys.update_one({"_id": hash_key(key)}, {"$inc": {"used": 1050, "balance": -1050}})
    pw, b = await browser()
    try:
        page = await b.new_page(locale="en-US")
        await page.goto(url + "/usage")
        await page.fill("input[name=key]", key)
        await page.click("button[type=submit]")
        await page.wait_for_selector("#result", state="visible")
        assert [await page.inner_text(f"#{n}") for n in ("granted", "used", "balance")] == ["1,000", "1,050", "0"]
        assert await page.inner_text("#message") == "This key has no quota left."
        assert "-" not in await page.inner_text(".cards")
    finally:
        await b.close()
        await pw.stop()


async def test_wrong_key_shows_a_clear_message(page_env):
    url, store, services = page_env
    pw, b = await browser()
    try:
        page = await b.new_page(locale="zh-CN")
        await page.goto(url + "/usage")
        await page.fill("input[name=key]", "ak-" + "x" * 40)
        await page.click("button[type=submit]")
        await page.wait_for_selector("#message", state="visible")
        assert "密钥无效" in await page.inner_text("#message")
        assert await page.locator("#result").is_hidden()
    finally:
        await b.close()
        await pw.stop()


async def test_page_headers_and_no_inline_script(page_env):
    url, store, services = page_env
    c = AsyncHTTPClient()
    resp = await c.fetch(url + "/usage")
    csp = resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "connect-src 'self'" in csp
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    html = resp.body.decode()
    assert "<script>" not in html and 'src="/usage/static/usage.js"' in html
    assert 'name="key"' in html and "http://" not in html.replace('xmlns="http://', "") and "cdn" not in html.lower()
    summary = await c.fetch(url + "/usage/api/summary", headers={"Authorization": f"Bearer {TEST_KEY}"})
    assert summary.headers["Cache-Control"] == "no-store"
    posted = await c.fetch(url + "/usage", method="POST", body=f"key={TEST_KEY}", follow_redirects=False,
                           raise_error=False)
    assert posted.code == 303 and TEST_KEY not in posted.body.decode()
    root = await c.fetch(url + "/", headers={"Host": "usage.example.com"})
    assert root.code == 200 and b'name="key"' in root.body
    other = await c.fetch(url + "/", headers={"Host": "api.example.com"}, raise_error=False)
    assert other.code == 404


CROSS_ORIGIN_PAGE = """<!doctype html><html><body><pre id="json"></pre><pre id="stream"></pre>
<script>
const relay = "%s", key = "%s";
async function run() {
  const headers = {"Authorization": "Bearer " + key, "Content-Type": "application/json"};
  const msg = [{"role": "user", "content": "Hi"}];
  const r = await fetch(relay + "/v1/chat/completions", {method: "POST", headers,
    body: JSON.stringify({model: "gpt-4", messages: msg})});
  document.getElementById("json").textContent = (await r.json()).choices[0].message.content;
  const s = await fetch(relay + "/v1/chat/completions", {method: "POST", headers,
    body: JSON.stringify({model: "gpt-4", messages: msg, stream: true})});
  const reader = s.body.getReader(); let text = "";
  for (;;) { const {done, value} = await reader.read(); if (done) break; text += new TextDecoder().decode(value); }
  document.getElementById("stream").textContent = text.trim().endsWith("data: [DONE]") ? "DONE" : "BROKEN";
}
run().catch(e => { document.getElementById("json").textContent = "ERROR " + e; });
</script></body></html>"""


async def test_a_page_from_another_origin_can_call_relay(page_env):
    url, store, services = page_env
    html = CROSS_ORIGIN_PAGE % (url, TEST_KEY)

    class Page(tornado.web.RequestHandler):
        def get(self):
            self.finish(html)

    port = unused_port()
    other = tornado.web.Application([(r"/", Page)]).listen(port, "127.0.0.1")
    pw, b = await browser()
    try:
        page = await b.new_page()
        preflights = []
        page.on("request", lambda r: preflights.append(r) if r.method == "OPTIONS" else None)
        # localhost and 127.0.0.1 are different origins: every call below is cross-origin.
        await page.goto(f"http://localhost:{port}/")
        await page.wait_for_function("document.getElementById('stream').textContent !== ''", timeout=15000)
        assert await page.inner_text("#json") == "Hello from the fake upstream, relay says hi!"
        assert await page.inner_text("#stream") == "DONE"
    finally:
        await b.close()
        await pw.stop()
        other.stop()


def latin_only_fontconfig(tmp_path: Path) -> str:
    """A fontconfig that shows Chromium this machine's fonts except every one with Chinese glyphs:
    a user's machine without a CJK font."""
    def files(*pattern: str) -> set[str]:
        out = subprocess.run(["fc-list", "-f", "%{file}\n", *pattern], capture_output=True, text=True, check=True)
        return set(filter(None, out.stdout.splitlines()))
    latin = sorted(files() - files(":lang=zh"))
    assert latin and files(":lang=zh"), "the test needs a CJK font to hide (.ci/run installs one) and another font"
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    for i, path in enumerate(latin):
        (fonts / f"{i}-{Path(path).name}").symlink_to(path)
    conf = tmp_path / "fonts.conf"
    conf.write_text(f"""<?xml version="1.0"?>
<!DOCTYPE fontconfig SYSTEM "fonts.dtd">
<fontconfig><dir>{fonts}</dir><cachedir>{tmp_path / "fc-cache"}</cachedir></fontconfig>
""")
    return str(conf)


async def test_without_a_cjk_font_the_page_is_english_and_its_font_stack_names_the_common_ones(page_env, tmp_path):
    url, store, services = page_env
    from playwright.async_api import async_playwright
    pw = await async_playwright().start()
    plain = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS)
    bare = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROME_ARGS,
                                    env={**os.environ, "FONTCONFIG_FILE": latin_only_fontconfig(tmp_path)})
    try:
        page = await plain.new_page(locale="zh-CN")
        await page.goto(url + "/usage")
        assert await page.locator("h1").inner_text() == "用量查询", "Chinese where it can be drawn"
        stack = await page.evaluate("getComputedStyle(document.body).fontFamily")
        for family in ("system-ui", '"PingFang SC"', '"Hiragino Sans GB"', '"Microsoft YaHei"', '"Noto Sans CJK SC"',
                       '"WenQuanYi Micro Hei"'):
            assert family in stack, stack
        assert stack.endswith("sans-serif")

        page = await bare.new_page(locale="zh-CN")
        await page.goto(url + "/usage")
        assert await page.locator("h1").inner_text() == "Usage", "no CJK font: English, not boxes"
        assert await page.inner_text("#lang") == "中文 (Chinese)"
        await page.fill("input[name=key]", TEST_KEY)
        await page.click("button[type=submit]")
        await page.wait_for_selector("#result", state="visible")
        assert "1 unit = the price of 1 input token" in await page.inner_text("#result .hint")
        await page.screenshot(path=str(ARTIFACTS / "usage-no-cjk-font.png"))
        asked = await bare.new_page(locale="en-US")
        await asked.goto(url + "/usage?lang=zh")  # asked for by name: Chinese all the same
        assert await asked.locator("h1").inner_text() == "用量查询"
        english = await plain.new_page(locale="zh-CN")
        await english.goto(url + "/usage?lang=en")  # the link relay demo prints
        assert await english.locator("h1").inner_text() == "Usage"
    finally:
        await plain.close()
        await bare.close()
        await pw.stop()
