"""The diffusion engine on tiny random-weight models, loaded through its real loading code (CPU)."""

from __future__ import annotations

import base64
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
from diffusers import LCMScheduler

from tests.tiny_models import TinyModels
from worker.engines import create_engine
from worker.engines.base import EngineError
from worker.engines.diffusion import DiffusionEngine, DiffusionParams, parse_params
from worker.engines.diffusion.blending import blend, seed_noise, slerp
from worker.engines.diffusion.filter import SimilarImageFilter
from worker.engines.diffusion.pose import COLOURS, draw_skeleton, openpose_points
from worker.engines.diffusion.preprocessors import PREPROCESSORS, preprocessor
from worker.engines.diffusion.stream import Conditioning, StreamConfig, StreamDenoiser, unet_batch_sizes

pytestmark = pytest.mark.diffusion
SIZE = 384


def engine(tiny: TinyModels, **params: Any) -> DiffusionEngine:
    """A loaded engine on the tiny SD model with fast defaults; ``params`` override them."""
    result = DiffusionEngine(tiny.fast_params(SIZE, **params))
    result.load()
    return result


def frames(seed: int = 0, count: int = 1, shape: tuple[int, int] = (SIZE, SIZE)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(count)]


def run(eng: DiffusionEngine, inputs: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Process a sequence of batches; return every output frame."""
    return [out for batch in inputs for out in eng.process(batch)]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


SEQUENCE = [frames(i) for i in range(3)]


@pytest.fixture(scope="module")
def reference(tiny: TinyModels) -> list[np.ndarray]:
    """What an engine with the test defaults makes of ``SEQUENCE``."""
    return run(engine(tiny), SEQUENCE)


def test_registry_creates_the_engine_from_params(tiny: TinyModels) -> None:
    eng = create_engine("diffusion", {"model_id": str(tiny.sd)})
    assert isinstance(eng, DiffusionEngine)
    assert eng.output_size == (512, 512)
    assert eng.batch_size == 1


def test_outputs_have_the_configured_size_and_dtype(tiny: TinyModels) -> None:
    eng = engine(tiny, width=448, frame_buffer_size=2)
    assert eng.batch_size == 2
    assert eng.output_size == (448, SIZE)
    outputs = eng.process(frames(count=2, shape=(240, 320)))  # resized on the way in
    assert len(outputs) == 2
    for out in outputs:
        assert out.shape == (SIZE, 448, 3)
        assert out.dtype == np.uint8
    info = eng.info()
    assert info["device"] == "cpu" and info["acceleration"] == "sdpa" and info["vae"] == "tiny"


def test_same_seed_gives_the_same_frames(tiny: TinyModels) -> None:
    first = run(engine(tiny, seed=7), SEQUENCE)
    assert same(first, run(engine(tiny, seed=7), SEQUENCE))
    assert not same(first, run(engine(tiny, seed=8), SEQUENCE))


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a watercolor castle"},
        {"seed": 1234},
        {"seed": [[1, 0.5], [2, 0.5]], "seed_interpolation_method": "slerp"},
        {"guidance_scale": 3.0, "cfg_type": "full", "negative_prompt": "dark"},
        {"t_index_list": [5, 25, 40]},
        {"num_inference_steps": 30},
        {"delta": 0.2, "guidance_scale": 2.0},
    ],
)
def test_hot_updates_change_the_output_without_reload(
    tiny: TinyModels, reference: list[np.ndarray], change: dict[str, Any]
) -> None:
    eng = engine(tiny)
    pipe = eng._model.models.pipe
    assert eng.update(change) == set()
    assert eng._model.models.pipe is pipe
    assert not same(reference, run(eng, SEQUENCE))
    assert all(eng.params[key] == value for key, value in change.items())


def test_prompt_blend_with_zero_weight_equals_the_single_prompt(tiny: TinyModels) -> None:
    single = run(engine(tiny, prompt="a red fox"), SEQUENCE)
    for method in ("linear", "slerp"):
        blended = engine(
            tiny, prompt=[["a red fox", 1.0], ["a blue car", 0.0]], prompt_interpolation_method=method
        )
        assert same(single, run(blended, SEQUENCE))
    halfway = engine(tiny, prompt=[["a red fox", 1.0], ["a blue car", 1.0]])
    assert not same(single, run(halfway, SEQUENCE))


def test_reload_fields_are_returned_and_left_unapplied(tiny: TinyModels) -> None:
    eng = engine(tiny)
    reload = eng.update({"model_id": "stabilityai/sdxl-turbo", "width": 512, "prompt": "a boat"})
    assert reload == {"model_id", "width"}
    assert eng.output_size == (SIZE, SIZE)
    assert eng.params["model_id"] == str(tiny.sd)
    assert eng.params["prompt"] == "a boat"
    assert eng.update({"acceleration": "none", "enable_similar_image_filter": True}) == {
        "acceleration",
        "enable_similar_image_filter",
    }
    assert eng.update({"width": SIZE}) == set()


def test_similar_frames_are_skipped(tiny: TinyModels) -> None:
    eng = engine(tiny, enable_similar_image_filter=True, similar_image_filter_max_skip_frame=2)
    frame = frames(3)
    first = eng.process(frame)
    assert same(first, eng.process([frame[0].copy()]))
    assert eng.info()["frames_skipped"] == 1
    eng.process(frame)
    eng.process(frame)  # the third skip in a row is over the limit: processed
    assert eng.info()["frames_skipped"] == 2
    eng.process(frames(4))
    assert eng.info()["frames_skipped"] == 2


def test_filter_skip_probability_follows_similarity() -> None:
    filt = SimilarImageFilter(threshold=0.9, max_skip_frame=10)
    assert filt.skip_probability(0.5) == 0.0
    assert filt.skip_probability(0.95) == pytest.approx(0.5)
    assert filt.skip_probability(1.0) == 1.0
    assert SimilarImageFilter(threshold=1.0, max_skip_frame=10).skip_probability(1.0) == 0.0


@pytest.mark.parametrize("cfg_type", ["none", "self", "initialize", "full"])
@pytest.mark.parametrize("batched", [True, False])
def test_every_rcfg_mode_runs(tiny: TinyModels, cfg_type: str, batched: bool) -> None:
    eng = engine(
        tiny, cfg_type=cfg_type, guidance_scale=1.5, use_denoising_batch=batched, frame_buffer_size=2
    )
    outputs = run(eng, [frames(i, count=2) for i in range(2)])
    assert len(outputs) == 4 and all(o.shape == (SIZE, SIZE, 3) for o in outputs)


def test_one_step_batched_equals_sequential(tiny: TinyModels) -> None:
    params = {"t_index_list": [20], "cfg_type": "full", "guidance_scale": 1.4}
    batched = run(engine(tiny, **params), SEQUENCE)
    assert same(batched, run(engine(tiny, use_denoising_batch=False, **params), SEQUENCE))


def test_txt2img_ignores_the_input_and_img2img_does_not(tiny: TinyModels) -> None:
    # With two steps a frame comes out one call later, so compare the second outputs.
    one, two = [frames(1)] * 2, [frames(2)] * 2
    assert same(run(engine(tiny, mode="txt2img"), one), run(engine(tiny, mode="txt2img"), two))
    assert not same(run(engine(tiny), one)[1:], run(engine(tiny), two)[1:])


def test_full_vae_and_sdxl_run(tiny: TinyModels) -> None:
    full = engine(tiny, use_tiny_vae=False, vae_id=None)
    assert full.info()["vae"] == "full"
    assert full.process(frames())[0].shape == (SIZE, SIZE, 3)
    xl = engine(tiny, model_id=str(tiny.sdxl), guidance_scale=2.0, cfg_type="full")
    assert xl.info()["sdxl"] is True
    assert xl.process(frames())[0].shape == (SIZE, SIZE, 3)


def test_lora_and_lcm_lora_change_the_weights(tiny: TinyModels, reference: list[np.ndarray]) -> None:
    with_lora = run(engine(tiny, lora_dict={str(tiny.lora): 1.0}), SEQUENCE)
    with_lcm_lora = run(engine(tiny, use_lcm_lora=True, lcm_lora_id=str(tiny.lora)), SEQUENCE)
    assert not same(reference, with_lora)
    assert same(with_lora, with_lcm_lora)  # the same LoRA at weight 1, through the LCM-LoRA path


def test_controlnet_with_canny_and_hot_scale(tiny: TinyModels, reference: list[np.ndarray]) -> None:
    controlnet = {"model_id": str(tiny.controlnet), "preprocessor": "canny", "conditioning_scale": 1.0}
    eng = engine(tiny, controlnets=[controlnet])
    controlled = run(eng, SEQUENCE)
    assert not same(reference, controlled)
    assert eng.update({"controlnets": [{**controlnet, "conditioning_scale": 0.0}]}) == set()
    # Scale 0 is no ControlNet at all; from the second frame on, the latent buffer holds only new frames.
    assert same(reference[1:], run(eng, SEQUENCE)[1:])
    assert eng.update({"controlnets": [{**controlnet, "preprocessor": "blur"}]}) == {"controlnets"}
    assert eng.update({"controlnets": []}) == {"controlnets"}


def test_processing_blocks_are_hot(tiny: TinyModels, reference: list[np.ndarray]) -> None:
    eng = engine(tiny)
    blocks = {
        "image_preprocessing": {"processors": [{"type": "blur", "params": {"kernel_size": 9}}]},
        "image_postprocessing": {"processors": [{"type": "feedback", "params": {"feedback_strength": 0.5}}]},
        "latent_postprocessing": {"processors": [{"type": "latent_feedback"}]},
    }
    for name, block in blocks.items():
        assert eng.update({name: block}) == set()
        assert not same(reference, run(eng, SEQUENCE)), name
        assert eng.update({name: {**block, "enabled": False}}) == set()
    assert same(reference[1:], run(eng, SEQUENCE)[1:])
    with pytest.raises(EngineError, match="image_postprocessing processor 'openpose' is not supported"):
        eng.update({"image_postprocessing": {"processors": [{"type": "openpose"}]}})


def test_upscale_post_processing_enlarges_the_output(tiny: TinyModels) -> None:
    eng = engine(
        tiny, image_postprocessing={"processors": [{"type": "upscale", "params": {"scale_factor": 1.5}}]}
    )
    assert eng.process(frames())[0].shape == (SIZE * 3 // 2, SIZE * 3 // 2, 3)
    with pytest.raises(EngineError, match=r"scale_factor must be in 1\.\.4"):
        engine(
            tiny, image_postprocessing={"processors": [{"type": "upscale", "params": {"scale_factor": 8}}]}
        )


def test_skip_diffusion_passes_frames_through(tiny: TinyModels) -> None:
    eng = engine(tiny, skip_diffusion=True)
    frame = frames()
    assert same(frame, eng.process(frame))


def test_opencv_preprocessors_keep_the_frame_shape() -> None:
    frame = frames(shape=(64, 96))[0]
    for name in PREPROCESSORS:
        out = preprocessor(name, {})(frame)
        scale = 2 if name == "upscale" else 1
        assert out.shape == (64 * scale, 96 * scale, 3) and out.dtype == np.uint8
    assert preprocessor("canny", {"low_threshold": 50, "high_threshold": 90})(frame).shape == frame.shape


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("normal", {}, "needs model weights"),
        ("openpose", {"threshold": 2}, "threshold must be"),
        ("nope", {}, "unknown"),
        ("canny", {"radius": 2}, "takes parameters"),
        ("depth", {"radius": 2}, "takes parameters"),
        ("depth", {"detect_resolution": 5}, "detect_resolution must be"),
        ("hed", {"safe": True}, "takes parameters"),
    ],
)
def test_unusable_preprocessors_are_refused(tiny: TinyModels, name: str, params: dict, message: str) -> None:
    controlnet = {"model_id": str(tiny.controlnet), "preprocessor": name, "preprocessor_params": params}
    with pytest.raises(EngineError, match=message):
        DiffusionEngine({"controlnets": [controlnet]})


def test_depth_preprocessor_runs_a_depth_model(tiny: TinyModels, reference: list[np.ndarray]) -> None:
    depth = {
        "model_id": str(tiny.controlnet),
        "preprocessor": "depth",
        "preprocessor_params": {"model_id": str(tiny.depth), "detect_resolution": 140},
    }
    eng = engine(tiny, controlnets=[depth])
    estimator = eng._lane.controlnets[0].preprocess
    gradient = np.repeat(np.linspace(0, 255, SIZE, dtype=np.uint8)[None, :, None], SIZE, 0).repeat(3, 2)
    grey = estimator(gradient)
    assert grey.shape == gradient.shape and grey.dtype == np.uint8
    assert (grey[..., 0] == grey[..., 2]).all() and grey.min() == 0 and grey.max() == 255  # scaled per frame
    assert not same(reference, run(eng, SEQUENCE))
    loaded = dict(eng._model.neural._models)
    assert eng.update({"controlnets": [{**depth, "conditioning_scale": 0.5}]}) == set()
    assert (
        eng.update({"controlnets": [{**depth, "preprocessor_params": {"model_id": str(tiny.depth)}}]})
        == set()
    )
    assert eng._model.neural._models == loaded  # hot updates reuse the loaded model
    other = {**depth, "preprocessor_params": {"model_id": "somewhere/else"}}
    assert eng.update({"controlnets": [other]}) == {"controlnets"}


def test_hed_preprocessor_runs_the_hed_network(tiny: TinyModels, reference: list[np.ndarray]) -> None:
    hed = {
        "model_id": str(tiny.controlnet),
        "preprocessor": "hed",
        "preprocessor_params": {"model_id": str(tiny.hed)},
    }
    eng = engine(tiny, controlnets=[hed])
    detect = eng._lane.controlnets[0].preprocess
    square = np.zeros((SIZE, SIZE, 3), np.uint8)
    square[100:250, 120:300] = 255
    edges = detect(square)
    assert edges.shape == square.shape and edges.dtype == np.uint8 and (edges[..., 0] == edges[..., 1]).all()
    assert len(np.unique(edges)) > 2  # soft edges: a range of greys, following the input
    assert not np.array_equal(edges, detect(np.zeros_like(square)))
    assert not same(reference, run(eng, SEQUENCE))
    with pytest.raises(EngineError, match="HED model 'lllyasviel/Annotators' is not available"):
        engine(tiny, controlnets=[{**hed, "preprocessor_params": {}}])


def test_openpose_draws_the_skeleton_of_the_keypoints() -> None:
    coco = np.array(
        [
            [50, 20],
            [55, 15],
            [45, 15],
            [60, 18],
            [40, 18],
            [70, 40],
            [30, 40],
            [75, 60],
            [25, 60],
            [78, 80],
            [22, 80],
            [62, 90],
            [38, 90],
            [63, 120],
            [37, 120],
            [64, 150],
            [36, 150],
        ],
        np.float32,
    )
    scores = np.full(17, 0.9, np.float32)
    scores[16] = 0.1  # the right ankle is not seen
    points, confidence = openpose_points(coco, scores)
    assert points.shape == (18, 2) and tuple(points[1]) == (50, 40)  # the neck, between the shoulders
    canvas = draw_skeleton(160, 100, points, confidence >= 0.3)
    assert tuple(canvas[20, 50]) == (255, 0, 0)  # the nose: OpenPose's first colour
    assert tuple(canvas[40, 50]) == (255, 85, 0)  # the neck
    right_ankle = points[10].astype(int)
    assert tuple(canvas[right_ankle[1], right_ankle[0]]) == (0, 0, 0)  # not drawn
    assert canvas[100:110, 63].any()  # the left shin, between knee and ankle


def test_openpose_preprocessor_runs_vitpose(tiny: TinyModels, reference: list[np.ndarray]) -> None:
    pose = {
        "model_id": str(tiny.controlnet),
        "preprocessor": "openpose",
        "preprocessor_params": {"model_id": str(tiny.pose), "threshold": 0.0},
    }
    eng = engine(tiny, controlnets=[pose])
    skeleton = eng._lane.controlnets[0].preprocess(frames(shape=(240, 320))[0])
    assert skeleton.shape == (240, 320, 3) and skeleton.dtype == np.uint8
    assert (
        len({tuple(c) for c in skeleton.reshape(-1, 3)} & set(COLOURS)) >= 5
    )  # joints (random weights: some coincide)
    assert not same(reference, run(eng, SEQUENCE))


@pytest.mark.slow
def test_a_missing_depth_model_is_named(tiny: TinyModels) -> None:
    depth = {"model_id": str(tiny.controlnet), "preprocessor": "depth"}
    with pytest.raises(
        EngineError, match="depth model 'depth-anything/Depth-Anything-V2-Small-hf' is not available"
    ):
        engine(tiny, controlnets=[depth])


@pytest.mark.parametrize("model_id", ["/nonexistent/model", "nobody/not-a-cached-model"])
def test_a_missing_model_is_a_clear_error(model_id: str) -> None:
    eng = DiffusionEngine({"model_id": model_id})
    with pytest.raises(EngineError, match=f"model '{model_id}' is not available"):
        eng.load()


def test_a_missing_tiny_vae_or_lora_is_named(tiny: TinyModels) -> None:
    with pytest.raises(EngineError, match="tiny VAE 'madebyollin/taesd'"):
        engine(tiny, vae_id=None)
    with pytest.raises(EngineError, match="LoRA 'latent-consistency/lcm-lora-sdv1-5'"):
        engine(tiny, use_lcm_lora=True)


def test_ip_adapter_errors_are_clear(tiny: TinyModels) -> None:
    with pytest.raises(EngineError, match="faceid"):
        DiffusionEngine({"model_id": "Lykon/dreamshaper-8", "ip_adapter": {"type": "faceid"}})
    with pytest.raises(EngineError, match=r"not SD 2\.1"):
        DiffusionEngine({"ip_adapter": {"type": "regular"}})  # sd-turbo has no IP-Adapter
    with pytest.raises(EngineError, match="IP-Adapter 'h94/IP-Adapter' is not available"):
        engine(tiny, ip_adapter={"type": "regular"})


def data_url(rgb: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", rgb)
    assert ok
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode()


def test_ip_adapter_style_image_and_scale_are_hot(tiny: TinyModels) -> None:
    red, blue = (data_url(np.zeros((64, 64, 3), np.uint8) + np.uint8(c)) for c in ([255, 0, 0], [0, 0, 255]))

    def styled(style: str, scale: float = 1.0) -> DiffusionEngine:
        # One step and no RCFG keep no state between frames, so engines can be compared frame for frame.
        return engine(
            tiny,
            t_index_list=[20],
            cfg_type="none",
            ip_adapter_style_image_url=style,
            ip_adapter={"model_id": str(tiny.ip_adapter), "scale": scale},
        )

    eng = styled(red)
    pipe = eng._model.models.pipe
    assert pipe.image_encoder is not None  # loaded from models/image_encoder beside the adapter
    with_blue = run(styled(blue), SEQUENCE)
    assert not same(run(eng, SEQUENCE), with_blue)
    assert eng.update({"ip_adapter_style_image_url": blue}) == set()
    assert same(run(eng, SEQUENCE), with_blue)
    # Scale 0 turns the image attention off: the style image no longer matters.
    assert eng.update({"ip_adapter": {"model_id": str(tiny.ip_adapter), "scale": 0.0}}) == set()
    switched_off = run(eng, SEQUENCE)
    assert not same(switched_off, with_blue)
    assert same(switched_off, run(styled(red, scale=0.0), SEQUENCE))
    assert eng._model.models.pipe is pipe
    assert eng.update({"ip_adapter": {"model_id": "elsewhere/IP-Adapter"}}) == {"ip_adapter"}


def test_ip_adapter_on_sdxl(tiny: TinyModels) -> None:
    red, blue = (data_url(np.zeros((64, 64, 3), np.uint8) + np.uint8(c)) for c in ([255, 0, 0], [0, 0, 255]))
    outputs = [
        run(
            engine(
                tiny,
                model_id=str(tiny.sdxl),
                t_index_list=[20],
                cfg_type="none",
                ip_adapter={"model_id": str(tiny.ip_adapter)},
                ip_adapter_style_image_url=style,
            ),
            SEQUENCE,
        )
        for style in (red, blue)
    ]
    assert not same(*outputs)  # the SDXL adapter (sdxl_models/) is loaded and used


def test_ip_adapter_refuses_a_bad_style_image(tiny: TinyModels) -> None:
    with pytest.raises(EngineError, match="not valid base64"):
        engine(
            tiny,
            ip_adapter={"model_id": str(tiny.ip_adapter)},
            ip_adapter_style_image_url="data:image/png;base64,@@",
        )


def test_unknown_or_invalid_params_are_refused(tiny: TinyModels) -> None:
    with pytest.raises(EngineError, match="unknown parameter 'strength'"):
        DiffusionEngine({"strength": 0.5})
    with pytest.raises(EngineError, match="'width'"):
        DiffusionEngine({"width": 500})
    with pytest.raises(EngineError, match="non-decreasing"):
        DiffusionEngine({"t_index_list": [30, 10]})
    eng = engine(tiny)
    with pytest.raises(EngineError, match=r"unknown parameter 'controlnets\.0\.bogus'"):
        eng.update({"controlnets": [{"model_id": "x", "bogus": 1}]})


def test_defaults_follow_daydream() -> None:
    params = DiffusionParams()
    assert params.model_id == "stabilityai/sd-turbo"
    assert (params.prompt, params.seed, params.guidance_scale, params.delta) == ("flowers", 789, 1.0, 0.7)
    assert (params.num_inference_steps, params.t_index_list, params.width, params.height) == (
        50,
        [12, 20, 32],
        512,
        512,
    )
    assert parse_params({"prompt": [["a", 1], ["b", 2]]}).weighted_prompts() == [("a", 1.0), ("b", 2.0)]


@pytest.mark.parametrize(
    ("mode", "level", "said"),
    [
        ("xformers", logging.INFO, "using sdpa"),  # the default: quiet where xformers is not installed
        ("tensorrt", logging.WARNING, "falling back to sdpa"),
    ],
)
def test_unavailable_acceleration_falls_back_to_sdpa(
    tiny: TinyModels, mode: str, level: int, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        eng = engine(tiny, acceleration=mode)
    assert eng.info()["acceleration"] == "sdpa"
    (record,) = [r for r in caplog.records if f"acceleration {mode} unavailable" in r.getMessage()]
    assert record.levelno == level and "(needs CUDA, running on cpu)" in record.getMessage()
    assert said in record.getMessage()
    assert eng.process(frames())[0].shape == (SIZE, SIZE, 3)


def test_importing_the_registry_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, worker.engines, worker.engines.diffusion.params; print('torch' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[1],
    )
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("turbo", [True, False])
def test_stream_recovers_the_latents_an_oracle_denoises(batched: bool, turbo: bool) -> None:
    """With a perfect noise predictor every step lands on the clean latents: the schedule math is
    consistent.
    """
    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    clean = torch.randn(2, 4, 8, 8)

    def oracle(
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        steps: torch.Tensor,
        num_steps: int,
        cond: Conditioning,
    ) -> torch.Tensor:
        alpha = scheduler.alphas_cumprod[timesteps].sqrt().view(-1, 1, 1, 1)
        return (latents - alpha * clean.repeat(len(latents) // 2, 1, 1, 1)) / (1 - alpha**2).sqrt()

    config = StreamConfig(
        (4, 8, 8), frame_buffer_size=2, use_denoising_batch=batched, consistency_boundary=not turbo
    )
    stream = StreamDenoiser(oracle, scheduler, config, torch.device("cpu"), torch.float32)
    stream.set_schedule([10, 25, 40], 50)
    stream.set_noise(torch.randn(stream.noise_shape))
    stream.set_guidance(Conditioning(torch.zeros(1, 3, 2)), None, "none", 1.0, 0.0)
    for _ in range(3):
        assert torch.allclose(stream(stream.add_noise(clean)), clean, atol=1e-3)


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize(
    ("cfg_type", "guidance_scale"),
    [("none", 1.0), ("self", 2.0), ("initialize", 2.0), ("full", 2.0), ("full", 1.0)],
)
@pytest.mark.parametrize("steps", [1, 3])
def test_unet_batch_sizes_are_the_sizes_the_stream_calls_with(
    batched: bool, cfg_type: str, guidance_scale: float, steps: int
) -> None:
    seen: set[int] = set()

    def recording(latents: torch.Tensor, *_: object) -> torch.Tensor:
        seen.add(len(latents))
        return torch.zeros_like(latents)

    scheduler = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    config = StreamConfig(
        (4, 8, 8), frame_buffer_size=2, use_denoising_batch=batched, consistency_boundary=True
    )
    stream = StreamDenoiser(recording, scheduler, config, torch.device("cpu"), torch.float32)
    stream.set_schedule([10, 25, 40][:steps], 50)
    stream.set_noise(torch.randn(stream.noise_shape))
    cond = Conditioning(torch.zeros(1, 3, 2))
    stream.set_guidance(cond, cond, cfg_type, guidance_scale, 1.0)
    for _ in range(3):
        stream(stream.add_noise(torch.zeros(2, 4, 8, 8)))
    assert seen == unet_batch_sizes(steps, 2, cfg_type, guidance_scale, batched)


def test_slerp_and_blend() -> None:
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(slerp(a, b, 1.0), b, atol=1e-5)
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-5)
    assert torch.allclose(blend([a, b], [0.25, 0.75], "linear"), 0.25 * a + 0.75 * b)
    noise = seed_noise([(1, 1.0)], (1, 4, 8, 8), "linear", True)
    assert torch.equal(noise, seed_noise([(1, 3.0)], (1, 4, 8, 8), "slerp", True))


FLOAT16_CASES = {
    "default": lambda tiny: {},
    "cfg-full-batch2": lambda tiny: {"cfg_type": "full", "guidance_scale": 2.0, "frame_buffer_size": 2},
    "txt2img-full-vae": lambda tiny: {"mode": "txt2img", "use_tiny_vae": False, "vae_id": None},
    "controlnet-ip-adapter": lambda tiny: {
        "controlnets": [{"model_id": str(tiny.controlnet), "preprocessor": "canny"}],
        "ip_adapter": {"model_id": str(tiny.ip_adapter)},
    },
    "sdxl": lambda tiny: {"model_id": str(tiny.sdxl)},
    **{
        f"{name}-controlnet": lambda tiny, name=name: {
            "controlnets": [
                {
                    "model_id": str(tiny.controlnet),
                    "preprocessor": name,
                    "preprocessor_params": {
                        "model_id": str(getattr(tiny, "pose" if name == "openpose" else name))
                    },
                }
            ]
        }
        for name in ("depth", "hed", "openpose")
    },
}


#: over ~5 s each on two cores (pytest --durations): a depth, HED or pose network, an IP-Adapter, SDXL
SLOW_FLOAT16 = {"controlnet-ip-adapter", "sdxl", "depth-controlnet", "hed-controlnet", "openpose-controlnet"}


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, marks=pytest.mark.slow) if case in SLOW_FLOAT16 else case for case in FLOAT16_CASES],
)
def test_float16_runs_and_matches_float32(tiny: TinyModels, case: str) -> None:
    """CUDA runs the engine in float16; run that dtype here so a dtype mix-up fails on a CPU too."""
    params = tiny.fast_params(SIZE, **FLOAT16_CASES[case](tiny))
    outputs = {}
    for dtype in (torch.float32, torch.float16):
        eng = DiffusionEngine(params, dtype=dtype)
        eng.load()
        assert eng.info()["dtype"] == str(dtype).removeprefix("torch.")
        batches = [frames(i, count=eng.batch_size) for i in range(3)]
        outputs[dtype] = np.stack(run(eng, batches)).astype(np.float32)
    difference = np.abs(outputs[torch.float16] - outputs[torch.float32])
    assert difference.mean() < 0.5  # measured: under 0.06 of 255; NaN or overflow would blacken whole frames


@pytest.mark.slow
@pytest.mark.timeout(900)  # inductor compiles the tiny UNet in about a minute on two cores
def test_compile_matches_sdpa_and_batch_changes_reload(tiny: TinyModels, reference: list[np.ndarray]) -> None:
    eng = engine(tiny, acceleration="compile")
    assert eng.info()["acceleration"] == "compile"
    compiled = run(eng, SEQUENCE)
    assert max(np.abs(a.astype(int) - b).mean() for a, b in zip(compiled, reference, strict=True)) < 0.5
    assert eng.update({"prompt": "a boat", "t_index_list": [12, 25]}) == set()  # same UNet batch: hot
    # A third step, or CFG on every step, changes the UNet batch: a reload, not a recompile on the hot path.
    assert eng.update({"t_index_list": [5, 20, 30]}) == {"t_index_list"}
    assert eng.update({"cfg_type": "full", "guidance_scale": 1.5}) == {"cfg_type", "guidance_scale"}
    assert eng.params["t_index_list"] == [12, 25]
    assert engine(tiny).update({"t_index_list": [5, 20, 30]}) == set()  # uncompiled UNets take any batch
