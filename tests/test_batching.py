"""One diffusion model shared and batched across channels (tiny random-weight models on the CPU)."""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pytest

from media.codec import decode_image, encode_image
from tests.tiny_models import TinyModels
from wire.frames import Frame, ImageFormat
from worker.engines.base import Result
from worker.engines.diffusion import DiffusionEngine
from worker.engines.diffusion.channel import MODELS, DiffusionChannel
from worker.engines.diffusion.shared import SharedDiffusion
from worker.pipeline import ChannelPipeline, Events, PipelineOptions, engine_factory
from worker.pool import SharedPool

pytestmark = pytest.mark.diffusion
SIZE = 384
#: uint8 levels a channel's output may differ by between a batch and alone: float rounding in
#: batched convolutions (measured: at most 1)
TOLERANCE = 2


def frame(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)


def alone(params: dict[str, Any], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """What an engine with its own model makes of ``inputs``, one frame per call."""
    engine = DiffusionEngine(params)
    engine.load()
    try:
        return [engine.process([f])[0] for f in inputs]
    finally:
        engine.close()


def close_to(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b).max()) <= TOLERANCE


def differ(a: np.ndarray, b: np.ndarray) -> bool:
    """Far more than rounding apart (random tiny weights: prompts move a picture by 14-22 levels at most)."""
    return int(np.abs(a.astype(int) - b).max()) > 4 * TOLERANCE


@pytest.fixture
def pool() -> SharedPool[SharedDiffusion]:
    models: SharedPool[SharedDiffusion] = SharedPool(SharedDiffusion.close)
    yield models
    assert len(models) == 0, "a test left a model loaded"


def channels(pool: SharedPool[SharedDiffusion], params: Sequence[dict[str, Any]]) -> list[DiffusionChannel]:
    loaded = []
    for p in params:
        channel = DiffusionChannel(p, pool=pool)
        channel.load()
        loaded.append(channel)
    return loaded


def step_together(chans: Sequence[DiffusionChannel], inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Submit one frame per channel so that one step takes them all; their outputs, in order.

    The submissions are made on the step thread between two steps (``call``), so the next step
    finds every one of them pending.
    """
    shared = chans[0].shared
    assert shared is not None and all(c.shared is shared for c in chans)
    results: dict[int, Result] = {}
    finished = threading.Semaphore(0)

    def done(index: int) -> Callable[[Result], None]:
        def record(result: Result) -> None:
            results[index] = result
            finished.release()

        return record

    steps = shared.steps
    shared.call(lambda: [c.submit([f], done(i)) for i, (c, f) in enumerate(zip(chans, inputs, strict=True))])
    for _ in chans:
        assert finished.acquire(timeout=120)
    assert shared.steps == steps + 1, "the frames should have gone through one batched step"
    outputs = []
    for index in range(len(chans)):
        result = results[index]
        assert not isinstance(result, Exception), result
        outputs.append(result[0])
    return outputs


def four_channels(tiny: TinyModels) -> list[dict[str, Any]]:
    """Four channels on one model with their own prompts, seeds, schedules, guidance and layouts."""
    return [
        tiny.fast_params(SIZE, prompt="a red fox", seed=1),
        tiny.fast_params(
            SIZE, prompt="a blue car", seed=2, t_index_list=[20], cfg_type="full", guidance_scale=1.5
        ),
        tiny.fast_params(
            SIZE, prompt="a castle", seed=3, t_index_list=[5, 25, 40], guidance_scale=2.0, delta=0.5
        ),
        tiny.fast_params(
            SIZE,
            prompt="waves",
            seed=4,
            cfg_type="initialize",
            guidance_scale=1.4,
            use_denoising_batch=False,
            mode="txt2img",
        ),
    ]


def test_a_channel_in_a_batch_of_four_gives_what_it_gives_alone(
    tiny: TinyModels, pool: SharedPool[SharedDiffusion]
) -> None:
    params = four_channels(tiny)
    inputs = [[frame(10 * c + i) for i in range(3)] for c in range(4)]
    expected = [alone(p, frames) for p, frames in zip(params, inputs, strict=True)]
    chans = channels(pool, params)
    assert len(pool) == 1 and chans[0].shared is not None and chans[0].shared.lanes == 4
    batched = [step_together(chans, [inputs[c][i] for c in range(4)]) for i in range(3)]
    for c in range(4):
        for i in range(3):
            assert close_to(batched[i][c], expected[c][i]), (c, i)
    last = batched[-1]
    for a, b in itertools.combinations(range(4), 2):  # four prompts (and seeds...): four pictures
        assert differ(last[a], last[b]), (a, b)
    info = chans[0].info()
    assert info["shared_by"] == 4 and info["mean_batch"] == 4.0
    for channel in chans:
        channel.close()


def test_a_hot_change_in_one_channel_leaves_the_others_alone(
    tiny: TinyModels, pool: SharedPool[SharedDiffusion]
) -> None:
    params = [tiny.fast_params(SIZE, prompt="a red fox"), tiny.fast_params(SIZE, prompt="a blue car", seed=5)]
    inputs = [frame(i) for i in range(4)]
    untouched = alone(params[1], inputs)
    unchanged = alone(params[0], inputs)
    first, second = channels(pool, params)
    outputs = [step_together([first, second], [f, f]) for f in inputs[:2]]
    assert first.update({"prompt": "a green tree", "seed": 9, "t_index_list": [15, 35]}) == set()
    outputs += [step_together([first, second], [f, f]) for f in inputs[2:]]
    for i in range(4):
        assert close_to(outputs[i][1], untouched[i]), i
    assert close_to(outputs[1][0], unchanged[1]) and differ(outputs[3][0], unchanged[3])
    first.close()
    second.close()


def test_controlnet_settings_are_per_channel_in_a_batch(
    tiny: TinyModels, pool: SharedPool[SharedDiffusion]
) -> None:
    controlnet = {"model_id": str(tiny.controlnet), "preprocessor": "canny"}
    params = [
        tiny.fast_params(SIZE, controlnets=[controlnet]),
        tiny.fast_params(
            SIZE, controlnets=[{**controlnet, "preprocessor": "blur", "conditioning_scale": 0.5}]
        ),
        tiny.fast_params(SIZE, controlnets=[{**controlnet, "conditioning_scale": 0.0}], prompt="no control"),
    ]
    inputs = [frame(i) for i in range(2)]
    expected = [alone(p, inputs) for p in params]
    chans = channels(pool, params)
    assert len(pool) == 1  # one ControlNet model: one shared model
    batched = [step_together(chans, [f] * 3) for f in inputs]
    for c in range(3):
        for i in range(2):
            assert close_to(batched[i][c], expected[c][i]), (c, i)
    for channel in chans:
        channel.close()


def test_channels_that_cannot_share_a_batch_get_their_own_model(
    tiny: TinyModels, pool: SharedPool[SharedDiffusion]
) -> None:
    chans = channels(
        pool,
        [
            tiny.fast_params(SIZE, prompt="one"),
            tiny.fast_params(SIZE, prompt="two", t_index_list=[20], guidance_scale=1.2, cfg_type="full"),
            tiny.fast_params(SIZE, width=448),  # another latent shape
            tiny.fast_params(SIZE, lora_dict={str(tiny.lora): 1.0}),  # other weights
            tiny.fast_params(SIZE, model_id=str(tiny.sdxl)),  # another model
            tiny.fast_params(
                SIZE, ip_adapter={"model_id": str(tiny.ip_adapter)}
            ),  # an IP-Adapter: never shared
        ],
    )
    shared = [c.shared for c in chans]
    assert shared[0] is shared[1]
    assert len({id(s) for s in shared}) == 5 and len(pool) == 4
    assert [c.info()["shareable"] for c in chans] == [True] * 5 + [False]
    for channel in chans:
        channel.close()
    assert all(s is not None and s.model.models is None for s in shared)  # every model freed


def test_a_reload_that_still_fits_the_model_is_a_new_lane_not_a_new_model(
    tiny: TinyModels, pool: SharedPool[SharedDiffusion]
) -> None:
    (first,) = channels(pool, [tiny.fast_params(SIZE)])
    assert first.update({"enable_similar_image_filter": True}) == {"enable_similar_image_filter"}
    (second,) = channels(pool, [{**first.params, "enable_similar_image_filter": True}])
    assert second.shared is first.shared and len(pool) == 1
    first.close()
    assert second.shared is not None and second.shared.lanes == 1 and len(pool) == 1
    second.close()


def test_a_stream_that_stops_is_not_waited_for_and_a_fast_one_cannot_starve_a_slow_one(
    tiny: TinyModels, pool: SharedPool[SharedDiffusion]
) -> None:
    """A fast channel has a frame pending at every step, a slow one every fourth step, a third none.

    Every slow frame goes into the step right after it was submitted, and steps run without the
    silent channel.
    """
    fast, slow, silent = channels(
        pool, [tiny.fast_params(SIZE, seed=s, t_index_list=[20]) for s in (1, 2, 3)]
    )
    shared = fast.shared
    assert shared is not None and shared.lanes == 3
    image = [frame(0)]
    slow_waits: list[int] = []
    finished = threading.Event()
    steps = 12

    def slow_done(submitted_at: int) -> Callable[[Result], None]:
        def record(result: Result) -> None:
            assert not isinstance(result, Exception)
            slow_waits.append(shared.steps - submitted_at)

        return record

    def fast_done(result: Result) -> None:  # on the step thread, after the step that made it
        assert not isinstance(result, Exception)
        if shared.steps == steps:
            finished.set()
            return
        fast.submit(image, fast_done)  # always a frame pending, like a 60 fps stream
        if shared.steps % 4 == 0:
            slow.submit(image, slow_done(shared.steps))

    start = shared.steps
    shared.call(lambda: fast.submit(image, fast_done))
    assert finished.wait(timeout=300)
    assert start == 0 and shared.steps == steps  # no step waited for the silent channel
    assert slow_waits == [1, 1]  # submitted after steps 4 and 8, run in steps 5 and 9
    assert shared.frames == steps + len(slow_waits)
    assert shared.replaced == 0
    for channel in (fast, slow, silent):
        channel.close()


def png(seed: int) -> bytes:
    return encode_image(frame(seed), ImageFormat.PNG)


def test_adding_and_removing_channels_mid_stream_never_mixes_frames(tiny: TinyModels) -> None:
    """Worker pipelines on one shared model: every output is its own channel's frame, in order.

    One step and no RCFG keep no state between frames, so each output can be checked against what
    that channel's params make of that input alone.
    """
    prompts = {"a": "a red fox", "b": "a blue car", "c": "a castle"}
    params = {
        name: tiny.fast_params(SIZE, prompt=text, t_index_list=[20], cfg_type="none")
        for name, text in prompts.items()
    }
    seeds = {name: [100 * n + i for i in range(6)] for n, name in enumerate(prompts)}
    expected = {name: alone(params[name], [frame(s) for s in seeds[name]]) for name in prompts}
    outputs: queue.Queue[Frame] = queue.Queue()
    options = PipelineOptions(output_format=ImageFormat.PNG)
    pipelines: dict[str, ChannelPipeline] = {}

    def start(name: str) -> None:
        pipeline = ChannelPipeline(
            name, engine_factory("diffusion"), params[name], 0, Events(output=outputs.put), options
        )
        pipeline.start()
        pipelines[name] = pipeline

    def stop(name: str) -> None:
        pipeline = pipelines.pop(name)
        pipeline.stop()
        pipeline.join(timeout=60)

    received: dict[str, list[Frame]] = {name: [] for name in prompts}
    start("a")
    start("b")
    for seq in range(6):
        if seq == 2:
            start("c")  # joins the running model mid-stream
        if seq == 4:
            stop("b")  # leaves mid-stream
        live = sorted(pipelines)
        for name in live:
            pipelines[name].submit(Frame(name, seq, 0.0, SIZE, SIZE, ImageFormat.PNG, png(seeds[name][seq])))
        for _ in live:
            out = outputs.get(timeout=120)
            received[out.channel].append(out)
    for name in list(pipelines):
        stop(name)
    assert len(MODELS) == 0, "the shared model is freed with its last channel"
    sent = {"a": range(6), "b": range(4), "c": range(2, 6)}
    for name, frames in received.items():
        assert [f.seq for f in frames] == list(sent[name]), name
        for f in frames:
            assert f.channel == name
            assert close_to(decode_image(f.payload), expected[name][f.seq]), (name, f.seq)
