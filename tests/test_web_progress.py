"""The page shows a model download's bytes: "downloading <id> · 43% (1.2 of 2.8 GB) · about 31 s left".

The worker's progress (``{stage, done, total, unit, fraction, eta_s}``, see
``worker.pipeline.LoadProgress``) reaches the page in the stream's status;
here a real stream's status gets it added on its way to the page, in real
headless Chromium, and a real worker whose engine loads slowly (held by the
test at each stage) sends it the whole way: worker, relay, status, page. The
formatting itself (``/static/progress.js``) is also called directly in the
page for the sizes a download passes through.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from api.server.app import create_app
from api.server.http import running
from tests.api_fixtures import serving_worker
from tests.helpers import server_config
from tests.test_web_controls import KEY, shot, start
from tests.test_web_page import page, server  # noqa: F401  (fixtures)
from worker.engines import Engine

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


class HeldLoader(Engine):
    """Loads as a first download would: bytes, then a TensorRT-like build in steps; each stage waits
    for the test to let it go on (``GATES``), so the page is seen at each one."""

    name = "held"
    GATES = (threading.Event(), threading.Event())

    def load(self) -> None:
        self.progress("downloading tiny/model", int(1.2 * GIB), int(2.8 * GIB), "bytes")
        self.GATES[0].wait(60)
        self.progress("building the TensorRT engine", 2, 4, "steps")
        self.GATES[1].wait(60)

    def update(self, params: Mapping[str, Any]) -> set[str]:
        return set()

    def process(self, frames: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [255 - frame for frame in frames]


async def test_a_slow_load_shows_on_the_page_stage_by_stage_then_the_output(page):
    for gate in HeldLoader.GATES:
        gate.clear()
    app = create_app(server_config(KEY))
    try:
        async with running(app) as url, serving_worker(app, engine="held", factory=HeldLoader):
            starting = start(page, url)  # waits for output: runs while the test lets the load go on
            task = asyncio.create_task(starting)
            await page.wait_for_function(
                "document.querySelector('#progress-text')?.textContent.includes('GB')", timeout=30_000
            )
            assert await page.inner_text("#progress-text") == "downloading tiny/model · 42% (1.2 of 2.8 GB)"
            assert await page.inner_text("#state-badge") == "LOADING"
            await shot(page, "slow-load-bytes")
            HeldLoader.GATES[0].set()
            await page.wait_for_function(
                "document.querySelector('#progress-text').textContent.includes('step')", timeout=30_000
            )
            assert await page.inner_text("#progress-text") == "building the TensorRT engine · step 3 of 4"
            HeldLoader.GATES[1].set()
            await task  # ONLINE, and output on the page
            assert await page.locator("#progress-box").is_hidden()
    finally:
        for gate in HeldLoader.GATES:
            gate.set()
