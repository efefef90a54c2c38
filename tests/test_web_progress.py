"""The page shows a model download's bytes: "downloading <id> · 43% (1.2 of 2.8 GB) · about 31 s left".

The worker's progress (``{stage, done, total, unit, fraction, eta_s}``, see
``worker.pipeline.LoadProgress``) reaches the page in the stream's status;
here a real stream's status gets it added on its way to the page, in real
headless Chromium. The formatting itself (``/static/progress.js``) is also
called directly in the page for the sizes a download passes through.
"""

from __future__ import annotations

import json

import pytest

from tests.test_web_controls import shot, start
from tests.test_web_page import page, server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.browser
GIB, MIB = 2**30, 2**20


async def test_a_download_in_bytes_shows_its_percentage_and_sizes_then_the_next_stage(server, page):
    url, _app = server
    progress: dict = {}

    async def amend(route):
        response = await route.fetch()
        body = await response.json()
        if progress:
            body["data"].update(detail="loading", progress=progress)
        await route.fulfill(response=response, body=json.dumps(body))

    await page.route("**/v1/streams/*/status", amend)
    await start(page, url)
    progress.update(
        stage="downloading stabilityai/sd-turbo",
        done=int(1.2 * GIB),
        total=int(2.8 * GIB),
        unit="bytes",
        fraction=0.4286,
        eta_s=30.2,
    )
    await page.wait_for_function("document.querySelector('#progress-text').textContent.includes('GB')")
    text = await page.inner_text("#progress-text")
    assert text == "downloading stabilityai/sd-turbo · 42% (1.2 of 2.8 GB) · about 31 s left"
    assert await page.evaluate("document.querySelector('#progress').value") == pytest.approx(0.4286)
    await shot(page, "progress-bytes")

    progress.clear()
    progress.update(stage="warming up", done=3, total=4, unit="steps", fraction=0.75)
    await page.wait_for_function(
        "document.querySelector('#progress-text').textContent === 'warming up · step 4 of 4'"
    )
    assert await page.evaluate("document.querySelector('#progress').value") == 0.75  # steps: no sizes


@pytest.mark.parametrize(
    ("progress", "text"),
    [
        (
            {"stage": "downloading m", "done": 0, "total": 2 * GIB, "unit": "bytes", "fraction": 0},
            "0% (0.0 of 2.0 GB)",
        ),
        (
            {
                "stage": "downloading m",
                "done": 100 * MIB,
                "total": 400 * MIB,
                "unit": "bytes",
                "fraction": 0.25,
            },
            "25% (100 of 400 MB)",
        ),
        (
            {"stage": "downloading m", "done": 25995, "total": 25995, "unit": "bytes", "fraction": 1},
            "100% (25 of 25 kB)",
        ),
        ({"stage": "downloading m", "done": 3 * MIB, "total": None, "unit": "bytes"}, "3 MB"),
    ],
    ids=["start", "MB", "kB-done", "no-total"],
)
async def test_byte_sizes_read_in_one_unit_with_the_percentage_first(server, page, progress, text):
    url, _app = server
    await page.goto(url + "/")
    said = await page.evaluate(
        "(p) => import('/static/progress.js').then((m) => m.progressText(p))", progress
    )
    assert said == f"downloading m · {text}"
