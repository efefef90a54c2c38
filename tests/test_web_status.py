"""What the page says is happening, and the viewer page, in real headless Chromium.

* A stream waiting for a worker slot says so, with the slots in use, and
  plays once the slot frees.
* A model the worker cannot load (a real diffusion worker asked for a model
  that is not on this machine) shows the engine's own error on the page.
* ``/view/{playback_id}`` shows the output alone, over WHEP and over MJPEG.

Screenshots go to ``artifacts/``.
"""

from __future__ import annotations

import json

import httpx
import pytest

from api.server.app import create_app
from api.server.http import running
from api.server.services import services
from tests.api_fixtures import serving_worker
from tests.helpers import server_config
from tests.test_web_controls import TIMEOUT, shot, start
from tests.test_web_page import KEY, page, playwright_api, server  # noqa: F401

pytestmark = pytest.mark.browser
MISSING_MODEL = "nobody/not-a-cached-model"


async def begin(page, url: str, **fields: str) -> None:
    """Open the page, fill text fields by name, press Start (without waiting for output)."""
    await page.goto(url + "/")
    await page.wait_for_function("document.body.dataset.formReady === '1'")
    await page.fill("#api-key", KEY)
    for name, value in fields.items():
        await page.fill(f"[name={name}]", value)
    await page.click("#start")


async def message(page, name: str) -> str:
    selector = f"#messages [data-message={name}]"
    try:
        await page.wait_for_selector(selector, timeout=60_000)
    except playwright_api.TimeoutError as exc:
        await shot(page, f"no-{name}-message")
        said = await page.inner_text("#messages")
        raise AssertionError(f"no {name} message; the page says {said!r}; {page.messages[-5:]}") from exc
    return await page.inner_text(selector)


async def test_waiting_for_a_slot_is_said_with_the_slots_in_use_then_the_stream_plays(server, page):
    url, _app = server  # one filter worker, one slot
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {KEY}"}) as api:
        holder = (await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": {}})).json()
        await begin(page, url)
        text = await message(page, "queue")
        assert "waiting for a slot: 1 of 1 in use" in text
        assert await page.inner_text("#state-badge") == "LOADING"
        await shot(page, "status-waiting")

        await api.delete(f"/v1/streams/{holder['id']}")  # the slot frees: this stream gets the worker
        await page.wait_for_function("document.body.dataset.state === 'ONLINE'", timeout=30_000)
        await page.wait_for_function("Math.max(...window.sampleOutput()) > 20", timeout=TIMEOUT)
        assert await page.locator("#messages [data-message=queue]").count() == 0


@pytest.fixture
async def diffusion_server():
    """A server whose only worker runs the diffusion engine (on the CPU here)."""
    app = create_app(server_config(KEY))
    async with running(app) as url, serving_worker(app, engine="diffusion", timeout=30):
        yield url, app


async def test_a_model_the_worker_cannot_load_shows_its_error(diffusion_server, page):
    url, app = diffusion_server
    await begin(page, url, model_id=MISSING_MODEL)
    text = await message(page, "engine-error")
    assert f"model '{MISSING_MODEL}' is not available" in text
    assert await page.inner_text("#state-badge") == "ERROR"
    stream_id = await page.evaluate("window.sd.stream.id")
    status = services(app).streams.status(services(app).streams.get(stream_id), url)
    assert status["inference_status"]["last_error"] in text  # the status's own words
    await shot(page, "status-model-error")
    await page.click("#stop")
    await page.wait_for_function("document.querySelector('#start').disabled === false")
    assert await page.inner_text("#messages") == ""


@pytest.mark.parametrize("via", ["whep", "mjpeg"])
async def test_the_viewer_page_shows_the_output_alone(server, page, via):
    url, _app = server
    await start(page, url)
    playback_id = await page.evaluate("window.sd.stream.output_playback_id")
    viewer = await page.context.new_page()
    await viewer.set_viewport_size({"width": 640, "height": 360})
    await viewer.goto(f"{url}/view/{playback_id}" + ("?via=mjpeg" if via == "mjpeg" else ""))
    await viewer.wait_for_function("Math.max(...window.sampleOutput()) > 20", timeout=TIMEOUT)
    element = "#mjpeg" if via == "mjpeg" else "#video"
    box = await viewer.locator(element).bounding_box()
    assert (box["width"], box["height"]) == (640, 360)  # the whole window
    assert await viewer.locator("button, input, select").count() == 0  # no controls
    await shot(viewer, f"viewer-{via}")
    await viewer.close()


async def test_the_viewer_page_retries_until_the_stream_exists(server, page):
    url, _app = server
    await page.goto(f"{url}/view/nosuchplaybackid")
    await page.wait_for_function("document.querySelector('#note').textContent.includes('retrying')")


async def test_progress_reloading_and_a_failed_reload_as_the_status_would_say_them(server, page):
    """Fields a status may carry (a worker's loading ``progress``, ``reloading``, ``last_reload_error``):
    the real status of a real stream, with those fields added on its way to the page."""
    url, _app = server
    extra: dict = {}

    async def amend(route):
        response = await route.fetch()
        body = await response.json()
        body["data"].update(extra.get("data", {}))
        body["data"]["inference_status"].update(extra.get("inference", {}))
        await route.fulfill(response=response, body=json.dumps(body))

    await page.route("**/v1/streams/*/status", amend)
    await start(page, url)
    mib = 2**20
    extra["data"] = {
        "detail": "loading",
        "progress": {"stage": "downloading weights", "bytes": 100 * mib, "total": 400 * mib, "eta_s": 12},
    }
    await page.wait_for_selector("#progress-box:not([hidden])")
    text = await page.inner_text("#progress-text")
    assert text == "downloading weights · 25% (100 of 400 MB) · about 12 s left"
    assert await page.evaluate("document.querySelector('#progress').value") == 0.25
    assert "loading the pipeline" in await message(page, "loading")

    extra["data"] = {"detail": "reloading"}
    assert "old pipeline is still serving" in await message(page, "reloading")
    assert await page.locator("#progress-box").is_hidden()

    extra["data"] = {}
    extra["inference"] = {
        "last_reload_error": {
            "params_version": 3,
            "error": "model 'x/y' is not available",
            "rejected_params": {"model_id": "x/y"},
            "time": 1_700_000_000_000,
        }
    }
    text = await message(page, "reload-error")
    assert "change v3 did not load" in text and "model 'x/y' is not available" in text
    assert "still running the previous model_id" in text
    await shot(page, "status-reload-error")
