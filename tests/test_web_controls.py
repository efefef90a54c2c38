"""The page as a tool, in real headless Chromium: every control group reaches the stream, presets,
charts, snapshot and recording, a clean Stop, and layouts from a phone to a wide screen.

A real server and a real filter worker, Debian's Chromium with its fake camera. A control's
change is checked where it lands: in the stream the server keeps (and the status the page
reads), and for the prompt and the effect in the output picture itself. Screenshots go to
``artifacts/``.
"""

from __future__ import annotations

import base64
import struct

import cv2
import numpy as np
import pytest

from api.server.services import services
from tests.helpers import ARTIFACTS
from tests.test_web_page import KEY, page, playwright_api, server  # noqa: F401

pytestmark = pytest.mark.browser
TIMEOUT = 20_000


async def start(page, url: str, transport: str = "whip", playback: str = "whep", query: str = "") -> str:
    """Open the page, start a stream, wait for output; the stream's id."""
    await page.goto(url + "/" + query)
    await page.wait_for_function("document.body.dataset.formReady === '1'")
    await page.fill("#api-key", KEY)
    await page.select_option("#transport", transport)
    await page.select_option("#playback", playback)
    await page.click("#start")
    try:
        await page.wait_for_function("document.body.dataset.state === 'ONLINE'", timeout=30_000)
        await page.wait_for_function("Math.max(...window.sampleOutput()) > 20", timeout=TIMEOUT)
    except playwright_api.TimeoutError as exc:
        await shot(page, "failed-start")
        raise AssertionError("no output: " + " | ".join(page.messages[-10:])) from exc
    return await page.evaluate("window.sd.stream.id")


async def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=ARTIFACTS / f"web-{name}.png", full_page=True)


async def applied(page, app, stream_id: str, check: str, arg=None) -> dict:
    """Wait until the status the page shows has params passing ``check`` (a JS predicate on them);
    the server's own record of the stream must agree."""
    try:
        await page.wait_for_function(
            f"(arg) => {{ const p = window.sd.lastParams; return !!p && ({check}); }}",
            arg=arg,
            timeout=TIMEOUT,
        )
    except playwright_api.TimeoutError as exc:
        seen = await page.evaluate("JSON.stringify(window.sd.lastParams)")
        error = await page.inner_text("#error")
        raise AssertionError(f"not applied: {check}; the status has {seen}; page error {error!r}") from exc
    return services(app).streams.get(stream_id).params


async def open_group(page, group: str) -> None:
    await page.evaluate(
        """(group) => {
            document.querySelector('#advanced').open = true;
            document.querySelector(`details[data-group="${group}"]`).open = true;
        }""",
        group,
    )


async def test_basic_controls_prompt_effect_and_numbers_reach_output_and_status(server, page):
    url, app = server
    stream_id = await start(page, url)
    before = await page.evaluate("window.sampleOutput()")

    # the prompt: the filter engine inverts for "negative"; the picture changes
    await page.fill("textarea[name=prompt]", "photo negative")
    params = await applied(page, app, stream_id, "p.prompt === 'photo negative'")
    assert params["prompt"] == "photo negative"
    await page.wait_for_function(
        "(then) => Math.max(...window.sampleOutput().map((v, i) => Math.abs(v - then[i]))) > 40",
        arg=before,
        timeout=TIMEOUT,
    )

    # the effect picker lists the filter engine's effects (from the status) and picks one
    await page.wait_for_selector("select[name=effect-picker]")
    effects = await page.eval_on_selector_all(
        "select[name=effect-picker] option", "os => os.map(o => o.value)"
    )
    assert {"sepia", "invert", "edges"} <= set(effects)
    inverted = await page.evaluate("window.sampleOutput()")
    await page.select_option("select[name=effect-picker]", "sepia")
    await page.wait_for_function(  # sepia: warm, red over green over blue, unlike the inverted picture
        """(then) => { const [r, g, b] = window.sampleOutput();
                       return r > g && g > b && Math.abs(r - then[0]) + Math.abs(b - then[2]) > 30; }""",
        arg=inverted,
        timeout=TIMEOUT,
    )

    # numbers, bounded by the schema: guidance (range + number), delta, seed, t_index_list
    assert await page.get_attribute("input[type=number][name=guidance_scale]", "max") == "20"
    await page.fill("input[type=number][name=guidance_scale]", "2.5")
    await page.fill("input[type=number][name=delta]", "0.4")
    await page.fill("input[type=number][name=seed]", "1234")
    await page.fill("input[name=t_index_list]", "8, 16")
    params = await applied(
        page,
        app,
        stream_id,
        "p.guidance_scale === 2.5 && p.delta === 0.4 && p.seed === 1234 && p.t_index_list.join() === '8,16'",
    )
    assert (params["guidance_scale"], params["delta"], params["seed"], params["t_index_list"]) == (
        2.5,
        0.4,
        1234,
        [8, 16],
    )

    # a value the API refuses is said next to its field, and the stream keeps what it had
    await page.fill("input[name=t_index_list]", "30, 10")
    await page.wait_for_selector("[data-field=t_index_list] .field-error")
    assert "non-decreasing" in await page.inner_text("[data-field=t_index_list] .field-error")
    assert services(app).streams.get(stream_id).params["t_index_list"] == [8, 16]
    await shot(page, "controls-basic")


async def test_blending_model_controlnets_ip_adapter_and_loras_reach_the_stream(server, page, tmp_path):
    url, app = server
    stream_id = await start(page, url)

    # prompt and seed blending: weighted lists, and the interpolation settings
    await page.click("button[data-blend=prompt]")
    await page.fill("input[name='prompt.1']", "oil painting")
    await page.fill("input[name='prompt.1.weight']", "0.25")
    await open_group(page, "blending")
    await page.select_option("select[name=prompt_interpolation_method]", "linear")
    await page.click("button[data-blend=seed]")
    params = await applied(
        page,
        app,
        stream_id,
        "Array.isArray(p.prompt) && p.prompt[1][0] === 'oil painting' && p.prompt[1][1] === 0.25"
        " && p.prompt_interpolation_method === 'linear' && Array.isArray(p.seed) && p.seed.length === 2",
    )
    assert params["prompt"][1] == ["oil painting", 0.25]

    # the model: a reload field (marked so), sent with the reloading PATCH
    assert "reload" in await page.text_content("[data-field=model_id] .label")
    await page.fill("input[name=model_id]", "Lykon/dreamshaper-8")
    params = await applied(page, app, stream_id, "p.model_id === 'Lykon/dreamshaper-8'")
    assert params["model_id"] == "Lykon/dreamshaper-8"

    # ControlNets: one added with a model of the stream's family, then its scale and preprocessor
    await open_group(page, "controlnets")
    await page.click("button[data-add=controlnets]")
    await page.fill("input[type=number][name='controlnets.0.conditioning_scale']", "0.6")
    await page.fill("input[name='controlnets.0.preprocessor']", "canny")
    params = await applied(
        page,
        app,
        stream_id,
        "p.controlnets.length === 1 && p.controlnets[0].conditioning_scale === 0.6"
        " && p.controlnets[0].preprocessor === 'canny'",
    )
    assert params["controlnets"][0]["model_id"].startswith("lllyasviel/")  # SD 1.5, like the model

    # IP-Adapter: on, its scale, and a style image chosen from a file (sent as a data: URL)
    await open_group(page, "ip_adapter")
    await page.check("input[name='ip_adapter.use']")
    await page.fill("input[type=number][name='ip_adapter.scale']", "0.7")
    image = tmp_path / "style.png"
    _ok, png = cv2.imencode(".png", np.full((32, 32, 3), (40, 90, 200), np.uint8))
    image.write_bytes(png.tobytes())
    await page.set_input_files("input[name='ip_adapter_style_image_url.file']", str(image))
    params = await applied(
        page,
        app,
        stream_id,
        "p.ip_adapter && p.ip_adapter.scale === 0.7"
        " && (p.ip_adapter_style_image_url || '').startsWith('data:image/png;base64,')",
    )
    data = params["ip_adapter_style_image_url"].split(",", 1)[1]
    assert base64.b64decode(data) == png.tobytes()

    # LoRAs: a weighted dict
    await open_group(page, "loras")
    await page.click("button[data-add=lora_dict]")
    await page.fill("input[name='lora_dict.0.key']", "my/style-lora")
    await page.fill("input[name='lora_dict.0.weight']", "0.8")
    params = await applied(page, app, stream_id, "p.lora_dict && p.lora_dict['my/style-lora'] === 0.8")
    assert params["lora_dict"] == {"my/style-lora": 0.8}
    await shot(page, "controls-advanced")


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


async def test_presets_save_load_and_share_as_a_link(server, page):
    url, app = server
    stream_id = await start(page, url)
    await page.fill("textarea[name=prompt]", "a pencil sketch")
    await page.fill("input[type=number][name=guidance_scale]", "3")
    await page.fill("#preset-name", "pencil")
    await page.click("#preset-save")
    await page.fill("textarea[name=prompt]", "photo negative")
    await applied(page, app, stream_id, "p.prompt === 'photo negative'")

    await page.select_option("#presets", "pencil")
    await page.click("#preset-load")
    params = await applied(page, app, stream_id, "p.prompt === 'a pencil sketch' && p.guidance_scale === 3")
    assert params["prompt"] == "a pencil sketch"
    assert await page.input_value("textarea[name=prompt]") == "a pencil sketch"

    await page.click("#preset-share")
    link = await page.get_attribute("#share-link", "href")
    assert "#preset=" in link
    other = await page.context.new_page()
    await other.goto(link)
    await other.wait_for_function("document.body.dataset.formReady === '1'")
    assert await other.input_value("textarea[name=prompt]") == "a pencil sketch"
    assert await other.input_value("input[type=number][name=guidance_scale]") == "3"
    await other.close()


@pytest.mark.parametrize(
    ("transport", "playback", "kind"), [("ws", "ws", "measured"), ("whip", "whep", "estimate")]
)
async def test_charts_update_and_latency_is_labelled(server, page, transport, playback, kind):
    url, _app = server
    await start(page, url, transport, playback)
    await page.wait_for_function(
        """() => { const d = window.sd.charts.fps.data, l = window.sd.charts.latency.data;
                   return d[0].length >= 3 && d[2][d[2].length - 1] > 0
                          && l[1].some((v) => v > 0) && l[3].some((v) => v > 0); }""",
        timeout=TIMEOUT,
    )
    first = await page.evaluate("window.sd.charts.fps.data[0].length")
    await page.wait_for_function(f"window.sd.charts.fps.data[0].length > {first}", timeout=TIMEOUT)
    assert kind in await page.inner_text("#g2g-label")
    assert (await page.inner_text("[data-stat=g2g]")).endswith("ms")
    # the charts are drawn: uPlot's canvases have the panel's width
    width = await page.evaluate("document.querySelector('#chart-fps canvas').width")
    assert width > 150
    await shot(page, f"charts-{transport}-{playback}")


async def test_snapshot_record_and_a_clean_stop(server, page):
    url, app = server
    stream_id = await start(page, url)
    async with page.expect_download() as info:
        await page.click("#snapshot")
    snapshot = await (await info.value).path()
    width, height = png_size(snapshot.read_bytes())
    assert (width, height) == (512, 512)

    await page.click("#record")
    await page.wait_for_function("window.sd.recordedBytes > 2000", timeout=TIMEOUT)
    async with page.expect_download() as info:
        await page.click("#record")
    webm = (await (await info.value).path()).read_bytes()
    assert webm[:4] == b"\x1a\x45\xdf\xa3" and len(webm) > 2000  # EBML: a WebM file

    await page.click("#stop")
    await page.wait_for_function("document.querySelector('#start').disabled === false")
    assert stream_id not in services(app).streams.streams
    assert await page.inner_text("#messages") == ""
    assert await page.inner_text("#state-badge") in ("idle", "IDLE")
    assert set(await page.eval_on_selector_all("[data-stat]", "ds => ds.map(d => d.textContent)")) == {
        "\u2013"
    }  # en dash
    assert await page.evaluate("window.sd.charts.fps.data[0].length") == 0
    assert await page.evaluate("document.querySelector('#output-video').srcObject") is None
    assert "start a stream" in await page.inner_text("#urls")
    await shot(page, "after-stop")


@pytest.mark.parametrize(("name", "viewport"), [("phone", (390, 844)), ("wide", (1920, 1080))])
async def test_layout_from_a_phone_to_a_wide_screen(server, page, name, viewport):
    url, _app = server
    await page.set_viewport_size({"width": viewport[0], "height": viewport[1]})
    await start(page, url)
    overflow = await page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{overflow} px wider than the {name} screen"
    box = {
        part: await page.locator(selector).bounding_box()
        for part, selector in (("videos", ".videos"), ("setup", "#setup"), ("status", "#status-panel"))
    }
    if name == "phone":  # one column, the pictures first
        assert box["videos"]["y"] < box["setup"]["y"] < box["status"]["y"]
        assert abs(box["videos"]["x"] - box["setup"]["x"]) < 2
    else:  # three columns: controls, pictures, status side by side
        assert box["setup"]["x"] < box["videos"]["x"] < box["status"]["x"]
        assert box["status"]["y"] < box["videos"]["y"] + box["videos"]["height"]
    await shot(page, f"layout-{name}")
