"""Third-party browser clients from npm, unmodified, against our server in real headless Chromium.

* hls.js (default config) plays a stream's ``hls_url`` from a page on another
  origin: the playlist and segments must carry CORS headers, and the first
  playlist request must not fail while the encoder starts.
* Medooze's ``whip-whep`` WHIPClient publishes the fake camera to the stream's
  ``whip_url`` and its WHEPClient plays ``output_stream_url``: both trickle
  their candidates with PATCH (the offer they POST has none), and both end
  with DELETE from ``stop()``.

The libraries come from npm at pinned versions (tests/browser_libs.py); the
test pages are served by a second server on another port, so every request
to the API is cross-origin. Screenshots go to ``artifacts/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import HTMLResponse, PlainTextResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from api.server.services import services
from common.listen import listen
from tests import browser_libs
from tests.api_fixtures import api, create_stream, eventually, feeding, worker  # noqa: F401  (fixtures)
from tests.helpers import ARTIFACTS, CHROMIUM
from tests.helpers import CHROMIUM_ARGS as ARGS

SIZE = 384

playwright_api = pytest.importorskip("playwright.async_api")
if not shutil.which(CHROMIUM):
    pytest.skip("Debian chromium is not installed (apt-get install chromium)", allow_module_level=True)

# a browser, an encoder and a worker on a shared machine: more than the default 120 s may be needed
pytestmark = [pytest.mark.browser, pytest.mark.timeout(240)]

# What the page shows is sampled through a canvas: frames decode when the video has a size and the
# canvas is not one flat colour (the luma's standard deviation over a grid of points).
SAMPLE_JS = """
window.sampleVideo = (video) => {
  const canvas = document.createElement("canvas");
  canvas.width = 64; canvas.height = 64;
  const context = canvas.getContext("2d", {willReadFrequently: true});
  context.drawImage(video, 0, 0, 64, 64);
  const pixels = context.getImageData(0, 0, 64, 64).data;
  let sum = 0, squares = 0, n = pixels.length / 4;
  const rgb = [0, 0, 0];
  for (let i = 0; i < pixels.length; i += 4) {
    const luma = 0.299 * pixels[i] + 0.587 * pixels[i + 1] + 0.114 * pixels[i + 2];
    sum += luma; squares += luma * luma;
    for (let c = 0; c < 3; c++) rgb[c] += pixels[i + c] / n;
  }
  const mean = sum / n;
  return {width: video.videoWidth, height: video.videoHeight, time: video.currentTime,
          mean, std: Math.sqrt(Math.max(squares / n - mean * mean, 0)), rgb};
};
"""

HLS_PAGE = """<!doctype html>
<html><head><title>hls.js</title><script src="/lib/{bundle}"></script></head>
<body><video id="video" muted autoplay playsinline width="640" height="640"></video>
<pre id="log"></pre>
<script>{sample}
window.hlsErrors = [];
const video = document.getElementById("video");
window.startHls = (url) => {{
  if (!Hls.isSupported()) throw new Error("hls.js: MediaSource with H.264 is not supported here");
  const hls = window.hls = new Hls();  // the default config
  hls.on(Hls.Events.ERROR, (event, data) => {{
    window.hlsErrors.push({{type: data.type, details: data.details, fatal: data.fatal,
                           status: data.response && data.response.code}});
    document.getElementById("log").textContent += data.details + (data.fatal ? " (fatal)" : "") + "\\n";
  }});
  hls.on(Hls.Events.MANIFEST_PARSED, () => video.play());
  hls.loadSource(url);
  hls.attachMedia(video);
}};
</script></body></html>
"""

WEBRTC_PAGE = """<!doctype html>
<html><head><title>whip-whep</title></head>
<body><video id="camera" muted autoplay playsinline width="320" height="240"></video>
<video id="output" muted autoplay playsinline width="384" height="384"></video>
<script>{sample}</script>
<script type="module">
import {{ WHIPClient }} from "/lib/{whip}";
import {{ WHEPClient }} from "/lib/{whep}";

// As the library's README does it: every camera track sendonly, one peer connection, max-bundle.
window.publish = async (url) => {{
  const media = await navigator.mediaDevices.getUserMedia(
    {{audio: true, video: {{width: 320, height: 240}}}});
  document.getElementById("camera").srcObject = media;
  const pc = window.publisherPc = new RTCPeerConnection({{bundlePolicy: "max-bundle"}});
  for (const track of media.getTracks()) pc.addTransceiver(track, {{direction: "sendonly"}});
  window.whip = new WHIPClient();
  await window.whip.publish(pc, url);
}};

window.play = async (url) => {{
  const pc = window.viewerPc = new RTCPeerConnection({{bundlePolicy: "max-bundle"}});
  pc.addTransceiver("video", {{direction: "recvonly"}});
  pc.ontrack = (event) => {{
    document.getElementById("output").srcObject = event.streams[0] || new MediaStream([event.track]);
  }};
  window.whep = new WHEPClient();
  await window.whep.view(pc, url);
}};

window.stopBoth = async () => {{
  await window.whip.stop();
  await window.whep.stop();
}};
window.ready = true;
</script></body></html>
"""


@dataclass
class Exchange:
    """One request the page made to the API, as Chromium saw it (CORS preflights are not reported)."""

    method: str
    url: str
    status: int | None  # None: failed (blocked by CORS, refused, aborted)
    body: str | None
    headers: dict[str, str]
    failure: str | None = None


@contextlib.asynccontextmanager
async def page_origin() -> AsyncIterator[str]:
    """A second server, on another port (so another origin than the API), serving the test pages and
    the vendored libraries under ``/lib/``; yields its base URL."""
    hls = browser_libs.bundle("hls.js")
    browser_libs.bundle("whip-whep")
    cache = browser_libs.CACHE
    whip_whep = browser_libs.PACKAGES["whip-whep"].directory.relative_to(cache)
    pages = {
        "hls.html": HLS_PAGE.format(bundle=hls.relative_to(cache).as_posix(), sample=SAMPLE_JS),
        "webrtc.html": WEBRTC_PAGE.format(
            whip=(whip_whep / "whip.js").as_posix(), whep=(whip_whep / "whep.js").as_posix(), sample=SAMPLE_JS
        ),
    }

    async def page(request):
        name = request.path_params["name"]
        return HTMLResponse(pages[name]) if name in pages else PlainTextResponse("not found", 404)

    app = Starlette(routes=[Route("/{name:str}", page), Mount("/lib", StaticFiles(directory=cache))])
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await eventually(lambda: server.started or task.done(), 10, "the page server to start")
        if task.done():
            task.result()
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


@pytest.fixture
async def browser_page(api, tmp_path) -> AsyncIterator:
    """A Chromium page with a log of its console and of its requests to the API (``page.exchanges``)."""
    async with page_origin() as origin, playwright_api.async_playwright() as p:
        # Chromium's fake microphone makes a pulse-* directory in its TMPDIR: keep it out of the run's
        browser = await p.chromium.launch(
            executable_path=CHROMIUM, args=ARGS, headless=True, env={**os.environ, "TMPDIR": str(tmp_path)}
        )
        context = await browser.new_context(viewport={"width": 1280, "height": 800})
        page = await context.new_page()
        page.origin = origin
        page.messages = messages = []
        page.exchanges = exchanges = []
        api_base = str(api.base_url).rstrip("/")
        page.on("console", lambda m: messages.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: messages.append(f"pageerror: {e}"))

        answers = {}  # request -> its exchange (Playwright hands over the same Request object)

        def answered(response) -> None:
            request = response.request
            if request.url.startswith(api_base):
                answers[request] = exchange = Exchange(
                    request.method, request.url, response.status, request.post_data, request.headers
                )
                exchanges.append(exchange)
            elif response.status >= 400:
                messages.append(f"page origin: {request.method} {request.url} -> {response.status}")

        def failed(request) -> None:
            if not request.url.startswith(api_base):
                return
            if request in answers:  # answered, then its body was dropped (nobody read it): fine
                answers[request].failure = request.failure
            else:  # no answer reached the page: refused, or blocked by CORS
                exchanges.append(
                    Exchange(
                        request.method, request.url, None, request.post_data, request.headers, request.failure
                    )
                )

        page.on("response", answered)
        page.on("requestfailed", failed)
        try:
            yield page
        finally:
            await browser.close()


def diagnosis(page) -> str:
    exchanges = [f"{e.method} {e.url.rsplit('/', 2)[-2:]} -> {e.status or e.failure}" for e in page.exchanges]
    return "console: " + " | ".join(page.messages[-15:]) + "\nrequests: " + " | ".join(exchanges[-20:])


async def wait_in_page(page, expression: str, timeout_s: float, shot: Path, arg=None) -> None:
    """``page.wait_for_function`` that fails with the page's console and requests (and a screenshot)."""
    try:
        await page.wait_for_function(expression, arg=arg, timeout=timeout_s * 1000)
    except playwright_api.TimeoutError:
        await page.screenshot(path=f"{shot}-failed.png")
        sample = await page.evaluate("window.lastSample || null")
        raise AssertionError(
            f"timed out waiting for {expression!r} (last sample {sample})\n" + diagnosis(page)
        ) from None


# Frames decode and show something (not one flat colour), and playback moves on.
PLAYING = """(args) => {
  const video = document.getElementById(args.id);
  const sample = window.lastSample = window.sampleVideo(video);
  return sample.width > 0 && sample.std > 10 && sample.time > args.after;
}"""


async def test_hls_js_plays_the_stream_from_another_origin(api, worker, browser_page):
    page = browser_page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "browser-hls-js"
    stream = await create_stream(api, width=SIZE, height=SIZE)
    assert not str(api.base_url).startswith(page.origin)  # every request to the API is cross-origin
    async with feeding(api, stream["id"]):
        await page.goto(f"{page.origin}/hls.html")
        await page.evaluate("(url) => window.startHls(url)", stream["hls_url"])
        try:
            await wait_in_page(page, PLAYING, 60, shot, {"id": "video", "after": 0})
            first = await page.evaluate("window.sampleVideo(document.getElementById('video'))")
            # currentTime advances: playback goes on past the first segment it started in
            await wait_in_page(page, PLAYING, 30, shot, {"id": "video", "after": first["time"] + 2})
            last = await page.evaluate("window.sampleVideo(document.getElementById('video'))")
        finally:
            await page.screenshot(path=f"{shot}.png")
    assert (first["width"], first["height"]) == (SIZE, SIZE), first
    errors = await page.evaluate("window.hlsErrors")
    assert not [e for e in errors if e["fatal"]], errors
    playlist = [e for e in page.exchanges if e.url == stream["hls_url"]]
    segments = [e for e in page.exchanges if e.url.endswith(".ts")]
    # hls.js read every answer (a CORS failure is a failed request), the first playlist included
    assert playlist and playlist[0].status == 200, diagnosis(page)
    assert segments and all(e.status == 200 for e in segments), diagnosis(page)
    assert all(e.status is not None for e in page.exchanges), diagnosis(page)
    assert not [m for m in page.messages if m.startswith("pageerror")], diagnosis(page)
    print(
        f"\nhls.js: {len(playlist)} playlist and {len(segments)} segment requests; "
        f"currentTime {first['time']:.1f} -> {last['time']:.1f} s; {len(errors)} non-fatal errors "
        f"{sorted({e['details'] for e in errors})}"
    )
    assert (await api.delete(f"/v1/streams/{stream['id']}")).status_code == 200


def _candidates(body: str | None) -> int:
    return sum(line.startswith("a=candidate:") for line in (body or "").splitlines())


async def test_whip_whep_library_publishes_plays_trickles_and_tears_down(api, worker, browser_page):
    page = browser_page
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "browser-whip-whep"
    stream = await create_stream(api, width=SIZE, height=SIZE)
    registry = services(api.app).webrtc.registry
    assert not str(api.base_url).startswith(page.origin)  # every request to the API is cross-origin
    await page.goto(f"{page.origin}/webrtc.html")
    await page.wait_for_function("window.ready === true", timeout=10_000)
    try:
        await page.evaluate("(url) => window.publish(url)", stream["whip_url"])
        await page.evaluate("(url) => window.play(url)", stream["output_stream_url"])
        await wait_in_page(page, PLAYING, 30, shot, {"id": "output", "after": 0})
        first = await page.evaluate("window.sampleVideo(document.getElementById('output'))")
        await wait_in_page(page, PLAYING, 20, shot, {"id": "output", "after": first["time"] + 1})
        await page.screenshot(path=f"{shot}.png")

        posts = {e.url: e for e in page.exchanges if e.method == "POST"}
        assert posts[stream["whip_url"]].status == 201 and posts[stream["output_stream_url"]].status == 201
        # the library POSTs its offer before gathering: no candidates there, all of them by PATCH
        assert _candidates(posts[stream["whip_url"]].body) == 0
        sessions = {session.kind: session for session in registry.for_stream(stream["id"])}
        assert sorted(sessions) == ["whep", "whip"]
        whip_location = f"{stream['whip_url']}/{sessions['whip'].id}"
        whep_location = f"{stream['output_stream_url']}/{sessions['whep'].id}"
        for location in (whip_location, whep_location):
            patches = [e for e in page.exchanges if e.method == "PATCH" and e.url == location]
            assert patches, f"no PATCH to {location}\n" + diagnosis(page)
            assert all(e.status == 204 for e in patches), diagnosis(page)
            assert sum(_candidates(e.body) for e in patches) > 0, [e.body for e in patches]
            assert any("a=end-of-candidates" in (e.body or "") for e in patches)
        # the WHIP client read our ETag (exposed to other origins) and sends it back in If-Match
        assert await page.evaluate("window.whip.etag") == sessions["whip"].etag
        assert {
            e.headers.get("if-match")
            for e in page.exchanges
            if e.method == "PATCH" and e.url == whip_location
        } == {sessions["whip"].etag}
        assert all(s.pc.connectionState == "connected" for s in sessions.values())
        assert (first["width"], first["height"]) == (SIZE, SIZE), first
        # through the worker: Chromium's fake camera is green, the stream's prompt inverts it (magenta)
        camera = (await page.evaluate("window.sampleVideo(document.getElementById('camera'))"))["rgb"]
        output = (await page.evaluate("window.sampleVideo(document.getElementById('output'))"))["rgb"]
        assert camera[1] > max(camera[0], camera[2]) + 40, camera
        assert output[1] < min(output[0], output[2]) - 40, output

        await page.evaluate("window.stopBoth()")
        try:
            await eventually(
                lambda: sum(e.method == "DELETE" for e in page.exchanges) == 2, 10, "the DELETEs' answers"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{diagnosis(page)}") from None
        deletes = {e.url: e.status for e in page.exchanges if e.method == "DELETE"}
        assert deletes == {whip_location: 200, whep_location: 200}, diagnosis(page)
        await eventually(lambda: not registry.sessions, 10, "the sessions to go")
        assert not [m for m in page.messages if m.startswith("pageerror")], diagnosis(page)
    finally:
        await page.screenshot(path=f"{shot}-end.png")
    patches = [e for e in page.exchanges if e.method == "PATCH"]
    print(
        f"\nwhip-whep: {len(patches)} PATCHes carrying "
        f"{sum(_candidates(e.body) for e in patches)} candidates; "
        f"requests: {json.dumps([(e.method, e.status) for e in page.exchanges])}"
    )
    assert (await api.delete(f"/v1/streams/{stream['id']}")).status_code == 200
