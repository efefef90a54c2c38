"""The web page in real headless Chromium: camera -> server -> page, params and stats live.

Chromium is Debian's (/usr/bin/chromium) with a fake camera; Playwright
drives it. Screenshots go to ``artifacts/`` (kept by CI as test artifacts).
"""

from __future__ import annotations

import shutil

import pytest

from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from tests.api_fixtures import serving_worker
from tests.helpers import ARTIFACTS, CHROMIUM, server_config
from tests.helpers import CHROMIUM_ARGS as ARGS

KEY = "page-test-key"

pytestmark = pytest.mark.browser
playwright_api = pytest.importorskip("playwright.async_api")
if not shutil.which(CHROMIUM):
    pytest.skip("Debian chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture
async def server():
    app = create_app(server_config(KEY, server={"degraded_input_fps": 0}))
    async with running(app) as url, serving_worker(app):
        yield url, app


@pytest.fixture
async def page():
    async with playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await context.new_page()
        messages: list[str] = []
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))
        page.messages = messages
        yield page
        await browser.close()


@pytest.mark.parametrize(("transport", "playback"), [("whip", "whep"), ("ws", "mjpeg"), ("ws", "ws")])
async def test_frames_flow_and_a_prompt_change_reaches_output_and_stats(server, page, transport, playback):
    url, app = server
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / f"web-{transport}-{playback}"
    await page.goto(url + "/")
    await page.wait_for_selector("textarea[name=prompt]")  # the form built from /api/settings
    await page.fill("#api-key", KEY)
    await page.fill("textarea[name=prompt]", "a pencil sketch")
    await page.select_option("#transport", transport)
    await page.select_option("#playback", playback)
    await page.click("#start")
    try:
        await page.wait_for_function("document.body.dataset.state === 'ONLINE'", timeout=30_000)
        await page.wait_for_function("Math.max(...window.sampleOutput()) > 20", timeout=20_000)
    except playwright_api.TimeoutError as exc:
        await page.screenshot(path=f"{shot}-failed.png")
        raise AssertionError("no output: " + " | ".join(page.messages[-10:])) from exc
    await page.screenshot(path=f"{shot}-before.png")
    before = await page.evaluate("window.sampleOutput()")
    version_before = int(await page.evaluate("document.body.dataset.outputParamsVersion"))

    await page.fill("textarea[name=prompt]", "photo negative")  # filter engine: invert
    stream_id = await page.evaluate("window.sd.stream.id")
    await page.wait_for_function(
        f"Number(document.body.dataset.outputParamsVersion) > {version_before}", timeout=20_000
    )
    assert services(app).streams.get(stream_id).params["prompt"] == "photo negative"
    await page.wait_for_function(
        "(then) => Math.max(...window.sampleOutput().map((v, i) => Math.abs(v - then[i]))) > 40",
        arg=before,
        timeout=20_000,
    )
    await page.screenshot(path=f"{shot}-after.png")
    stats = await page.inner_text("#stats")
    assert "ONLINE" in stats and "v0 of" not in stats

    await page.click("#stop")
    await page.wait_for_function("document.querySelector('#start').disabled === false")
    assert stream_id not in services(app).streams.streams
