"""The CPU engine: every effect changes the image, params pick effects, bad params fail clearly."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers import picture
from worker.engines import EngineError, create_engine
from worker.engines.filter import EFFECTS, effect_for


@pytest.mark.parametrize("effect", sorted(EFFECTS))
def test_every_effect_changes_the_image(effect):
    frame = picture(96, 64, seed=3)
    engine = create_engine("filter", {"effect": effect})
    (out,) = engine.process([frame])
    assert out.shape == frame.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - frame).mean() > 5


def test_effects_differ_from_each_other():
    frame = picture(96, 64, seed=3)
    outputs = {
        name: create_engine("filter", {"effect": name}).process([frame])[0].tobytes() for name in EFFECTS
    }
    assert len(set(outputs.values())) == len(EFFECTS)


def test_prompt_words_choose_the_effect():
    assert effect_for({"prompt": "a pencil sketch of a cat"}) == "sketch"
    assert effect_for({"prompt": [["cyberpunk city", 1.0]]}) == "neon"
    assert effect_for({"prompt": "flowers"}) == "cartoon"
    assert effect_for({"prompt": "sketch", "effect": "sepia"}) == "sepia"


def test_hot_update_changes_output_and_never_asks_for_reload():
    frame = picture(96, 64, seed=1)
    engine = create_engine("filter", {"effect": "edges"})
    before = engine.process([frame])[0]
    assert engine.update({"effect": "invert", "strength": 0.5}) == set()
    after = engine.process([frame])[0]
    assert not np.array_equal(before, after)
    np.testing.assert_allclose(after.astype(int), (frame * 0.5 + (255 - frame) * 0.5), atol=1)


def test_resizes_to_width_and_height():
    engine = create_engine("filter", {"width": 32, "height": 16})
    assert engine.process([picture(96, 64)])[0].shape == (16, 32, 3)
    assert engine.output_size == (32, 16)


@pytest.mark.parametrize(
    "params",
    [{"effect": "glitter"}, {"strength": 3}, {"strength": "x"}, {"width": 2, "height": 2}, {"width": 64}],
)
def test_bad_params_raise_engine_error(params):
    with pytest.raises(EngineError):
        create_engine("filter", params)
    engine = create_engine("filter", {})
    with pytest.raises(EngineError):
        engine.update(params)
    assert engine.effect == "cartoon"  # a rejected update changes nothing


def test_unknown_engine_name():
    with pytest.raises(EngineError, match="unknown engine"):
        create_engine("magic", {})
