"""Input of another aspect ratio is cropped or padded to the stream's size, never stretched.

The picture: a white disc inside a red border on grey, 640x480 (4:3) into a
512x512 stream. Stretched (the old behaviour) the disc is an ellipse;
cropped it stays round and the side borders go; padded it stays round, all
four borders stay and black bars appear above and below.
"""

from __future__ import annotations

import asyncio

import av
import cv2
import httpx
import numpy as np
import pytest

from api.server.app import create_app
from api.server.config import ConfigError, load_config
from api.server.http import running
from api.server.services import services
from api.webrtc.ingest import fitted_jpeg
from media.codec import decode_image, encode_image
from media.fit import fit_mode, fit_rgb, plan
from relay.local import LocalProducer, LocalViewer
from tests.api_fixtures import AUTH, KEY, api, create_stream, serving_worker, worker  # noqa: F401  (fixtures)
from tests.helpers import server_config
from tests.test_api import wait_until_ready
from worker.engines.diffusion.images import resize

SOURCE = (640, 480)
STREAM = (512, 512)
RADIUS = 120  # in the source
BORDER = 16
GREY, RED = (100, 100, 100), (255, 0, 0)


def source_picture() -> np.ndarray:
    width, height = SOURCE
    rgb = np.full((height, width, 3), GREY, np.uint8)
    rgb[:BORDER], rgb[-BORDER:], rgb[:, :BORDER], rgb[:, -BORDER:] = RED, RED, RED, RED
    cv2.circle(rgb, (width // 2, height // 2), RADIUS, (255, 255, 255), -1)
    return rgb


def disc_box(rgb: np.ndarray, bright: bool = True) -> tuple[int, int]:
    """Width and height of the disc: white pixels (or black ones, for an inverted picture)."""
    gray = rgb.astype(int).min(axis=2) if bright else rgb.astype(int).max(axis=2)
    ys, xs = np.nonzero(gray > 200 if bright else gray < 55)
    return int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)


def looks(rgb: np.ndarray, color: tuple[int, int, int]) -> bool:
    return bool(np.abs(rgb.reshape(-1, 3).mean(axis=0) - color).max() < 30)


def check(rgb: np.ndarray, mode: str, inverted: bool = False) -> None:
    """``rgb`` is the source fitted into the stream size by ``mode``, un-distorted."""
    assert (rgb.shape[1], rgb.shape[0]) == STREAM
    scale = max(STREAM[0] / SOURCE[0], STREAM[1] / SOURCE[1]) if mode == "crop" else STREAM[0] / SOURCE[0]
    width, height = disc_box(rgb, bright=not inverted)
    diameter = 2 * RADIUS * scale
    assert abs(width - height) <= 4 and abs(width - diameter) <= 6, (mode, width, height, diameter)

    def color(c: tuple[int, int, int]) -> tuple[int, int, int]:
        return (255 - c[0], 255 - c[1], 255 - c[2]) if inverted else c

    middle = STREAM[1] // 2
    if mode == "crop":  # top and bottom borders kept, the sides cut away
        assert looks(rgb[3:10, 100:400], color(RED)) and looks(rgb[-10:-3, 100:400], color(RED))
        assert looks(rgb[middle - 20 : middle + 20, 3:20], color(GREY))
    else:  # all four borders, inside black bars above and below
        bar = (STREAM[1] - round(SOURCE[1] * scale)) // 2
        assert bar == 64
        assert looks(rgb[3 : bar - 3, 100:400], color((0, 0, 0)))
        assert looks(rgb[bar + 3 : bar + 10, 100:400], color(RED))
        assert looks(rgb[middle - 20 : middle + 20, 3:10], color(RED))


def test_plans_keep_the_shape():
    assert plan(SOURCE, STREAM, "crop") == plan(SOURCE, STREAM)  # crop by default, as Daydream
    crop, pad = plan(SOURCE, STREAM, "crop"), plan(SOURCE, STREAM, "pad")
    assert (crop.scaled, crop.offset) == ((683, 512), (85, 0))
    assert (pad.scaled, pad.offset) == ((512, 384), (0, 64))
    assert plan((512, 512), (640, 384), "crop").scaled == (640, 640)
    assert fit_mode(None) == "crop"
    with pytest.raises(ValueError, match="crop, pad"):
        fit_mode("stretch")


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_arrays_are_cropped_or_padded(mode):
    check(fit_rgb(source_picture(), STREAM, mode), mode)
    check(resize(source_picture(), STREAM, mode), mode)  # the diffusion engine's resize: the same


def test_a_stretch_would_be_caught():
    """The check above fails on what the server used to do."""
    stretched = cv2.resize(source_picture(), STREAM, interpolation=cv2.INTER_AREA)
    with pytest.raises(AssertionError):
        check(stretched, "crop")


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_webrtc_frames_are_cropped_or_padded(mode):
    """The WHIP ingest's path: a decoded YUV frame, scaled by swscale, then cropped or padded."""
    frame = av.VideoFrame.from_ndarray(source_picture(), format="rgb24").reformat(format="yuv420p")
    check(decode_image(fitted_jpeg(frame, STREAM, mode)), mode)


async def fitted_output(api: httpx.AsyncClient, stream_id: str) -> np.ndarray:
    """One 640x480 picture through the stream (the filter worker, photo negative) as it comes out."""
    hub = services(api.app).relay.hub
    await asyncio.wait_for(wait_until_ready(api, stream_id), 15)
    with LocalProducer(hub, stream_id) as producer, LocalViewer(hub, stream_id) as viewer:
        producer.publish(encode_image(source_picture()), *SOURCE)
        frame = await viewer.next_frame(15)
    return decode_image(frame.payload)


async def test_the_filter_engine_crops_by_default_and_pads_when_a_stream_asks(api, worker):
    cropped = await create_stream(api)
    assert cropped["params"]["fit"] == "crop"
    check(await fitted_output(api, cropped["id"]), "crop", inverted=True)
    padded = await create_stream(api, fit="pad")
    assert padded["params"]["fit"] == "pad"
    check(await fitted_output(api, padded["id"]), "pad", inverted=True)
    # a PATCH changes it on the next frame
    response = await api.patch(f"/v1/streams/{padded['id']}", json={"params": {"fit": "crop"}})
    assert response.status_code == 200 and response.json()["params"]["fit"] == "crop"
    check(await fitted_output(api, padded["id"]), "crop", inverted=True)
    bad = await api.post("/v1/streams", json={"pipeline": "streamdiffusion", "params": {"fit": "stretch"}})
    assert bad.status_code == 422 and "fit" in bad.text


async def test_the_server_default_applies_to_streams_that_do_not_say():
    settings = server_config(KEY, pipeline={"fit": "pad"})
    app = create_app(settings)
    async with running(app) as url, httpx.AsyncClient(base_url=url, headers=AUTH, timeout=15) as client:
        client.app = app  # type: ignore[attr-defined]
        async with serving_worker(app):
            stream = await create_stream(client)
            assert stream["params"]["fit"] == "pad"
            check(await fitted_output(client, stream["id"]), "pad", inverted=True)


def test_the_config_file_sets_the_default():
    assert load_config(None, {"pipeline": {"fit": "pad"}}).pipeline.fit == "pad"
    assert load_config(None, {}).pipeline.fit == "crop"
    with pytest.raises(ConfigError, match=r"pipeline\.fit"):
        load_config(None, {"pipeline": {"fit": "stretch"}})


@pytest.mark.diffusion
@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_the_diffusion_engine_fits_as_its_params_say(tiny, mode):
    from tests.test_diffusion_engine import engine

    fitted = engine(tiny, skip_diffusion=True, width=STREAM[0], height=STREAM[1], fit=mode)
    check(fitted.process([source_picture()])[0], mode)
