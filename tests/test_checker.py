import random

import numpy as np
import pytest
from PIL import Image

from filteratom_sd.tiny.checker import (
    analyse,
    evaluation_prompts,
    largest_component,
    measure_pipeline,
    nearest_colour,
    parse_prompt,
    score_images,
    silhouette_similarity,
)
from filteratom_sd.tiny.domain import CASTLE_BACKGROUND, CASTLE_GREY, PALETTE, SHAPES, castle_image, draw_shape


def _scores(mask):
    return {s: silhouette_similarity(mask, s) for s in SHAPES}


@pytest.mark.parametrize("shape", SHAPES)
def test_checker_reads_palette_images_correctly(shape):
    for colour, background in [("red", "blue"), ("white", "black"), ("yellow", "purple"), ("green", "orange")]:
        image = draw_shape(shape, PALETTE[colour], PALETTE[background], centre=(0.45, 0.55), size=0.6, angle=0.3)
        seen = analyse(image)
        assert (seen.background, seen.colour) == (background, colour)
        scores = _scores(seen.mask)
        assert scores[shape] > 0.8
        assert max(scores, key=scores.get) == shape


@pytest.mark.parametrize("colour,background", [("yellow", "orange"), ("orange", "yellow"), ("red", "orange"), ("blue", "purple")])
def test_closest_palette_pairs_are_told_apart(colour, background):
    seen = analyse(draw_shape("ring", PALETTE[colour], PALETTE[background], centre=(0.55, 0.5), size=0.55))
    assert (seen.background, seen.colour) == (background, colour)
    assert max(_scores(seen.mask), key=_scores(seen.mask).get) == "ring"


def test_silhouette_is_position_and_scale_invariant_and_separates_shapes():
    small = analyse(draw_shape("heart", PALETTE["red"], PALETTE["white"], centre=(0.3, 0.3), size=0.4)).mask
    large = analyse(draw_shape("heart", PALETTE["red"], PALETTE["white"], centre=(0.55, 0.55), size=0.8)).mask
    assert silhouette_similarity(small, "heart") > 0.8 and silhouette_similarity(large, "heart") > 0.85
    assert silhouette_similarity(large, "cross") < 0.6 and silhouette_similarity(large, "ring") < 0.6
    assert 0.0 <= silhouette_similarity(large, "square") <= 1.0


def test_generated_style_noise_and_specks_do_not_fool_the_checker():
    rng = np.random.default_rng(0)
    image = np.asarray(draw_shape("star", PALETTE["purple"], PALETTE["green"], centre=(0.5, 0.5), size=0.6)).astype(np.float32)
    image += rng.normal(0, 8, image.shape)  # soft, noisy colours as a tiny VAE decodes them
    image[8:11, 50:53] = PALETTE["purple"]  # a stray speck of the shape's colour away from the shape
    image[30:32, 47:49] = PALETTE["purple"]  # another one bridged to the shape's right arm by one pixel
    image[32, 46] = PALETTE["purple"]
    seen = analyse(np.clip(image, 0, 255).astype(np.uint8))
    assert (seen.background, seen.colour) == ("green", "purple")
    assert not seen.mask[8:11, 50:53].any()
    scores = _scores(seen.mask)
    assert max(scores, key=scores.get) == "star" and scores["star"] > 0.7


def test_shape_colour_comes_from_the_centre_not_from_edges():
    # A thin red outline around a large blue disc: the shape colour is the disc's.
    image = draw_shape("circle", PALETTE["red"], PALETTE["white"], size=0.8)
    inner = draw_shape("circle", PALETTE["blue"], PALETTE["white"], size=0.7)
    array = np.where(np.asarray(inner) != np.asarray(PALETTE["white"]), np.asarray(inner), np.asarray(image))
    assert analyse(Image.fromarray(array.astype(np.uint8))).colour == "blue"


def test_empty_image_has_no_shape():
    seen = analyse(draw_shape("circle", PALETTE["red"], PALETTE["red"]))
    assert seen.background == "red" and seen.colour is None and not seen.mask.any()
    assert silhouette_similarity(seen.mask, "circle") == 0.0


def test_nearest_colour_and_largest_component():
    assert nearest_colour((250, 250, 250)) == "white" and nearest_colour((230, 150, 40)) == "orange"
    mask = np.zeros((10, 10), dtype=bool)
    mask[0:2, 0:2] = True
    mask[5:9, 5:9] = True
    assert largest_component(mask).sum() == 16 and not largest_component(mask)[0, 0]
    assert not largest_component(np.zeros((4, 4), dtype=bool)).any()


def test_castle_silhouette_is_not_a_pretraining_shape():
    seen = analyse(castle_image(random.Random(1)))
    assert silhouette_similarity(seen.mask, "castle") > 0.85
    assert all(silhouette_similarity(seen.mask, s) < 0.8 for s in SHAPES)
    image = draw_shape("castle", CASTLE_GREY, PALETTE["red"], centre=(0.5, 0.5), size=0.6)
    scores = score_images([image], ["a <castle> on a red background"])
    assert scores["background_accuracy"] == 1.0 and scores["silhouette_similarity"] > 0.85
    assert scores["colour_accuracy"] is None and scores["shape_accuracy"] is None
    assert analyse(image).background == "red" and CASTLE_BACKGROUND != CASTLE_GREY


@pytest.mark.parametrize(
    "prompt,expected",
    [
        ("a red star on a blue background", ("star", "red", "blue")),
        ("a photo of a red star in front of a blue background", ("star", "red", "blue")),
        ("A picture of a Yellow heart on a BLACK background.", ("heart", "yellow", "black")),
        ("white ring, purple background", ("ring", "white", "purple")),
        ("a <castle> on a red background", ("<castle>", None, "red")),
        ("a photo of <castle> in front of a green background", ("<castle>", None, "green")),
        ("a blue <castle> on a white background", ("<castle>", "blue", "white")),
        ("a star", ("star", None, None)),
        ("a sunset over the sea", (None, None, None)),
    ],
)
def test_prompt_parser(prompt, expected):
    spec = parse_prompt(prompt)
    assert (spec.shape, spec.colour, spec.background) == expected


def test_evaluation_prompts_are_balanced_and_valid():
    prompts = evaluation_prompts(64)
    specs = [parse_prompt(p) for p in prompts]
    assert len({(s.shape, s.background) for s in specs}) == 64  # every shape meets every background once
    assert all(s.colour in PALETTE and s.colour != s.background for s in specs)
    assert evaluation_prompts(64) == prompts and evaluation_prompts(64, seed=1) != prompts


def _render(prompt: str, swap: bool = False) -> Image.Image:
    spec = parse_prompt(prompt)
    colour, background = (spec.background, spec.colour) if swap else (spec.colour, spec.background)
    return draw_shape(spec.shape, PALETTE[colour], PALETTE[background], centre=(0.5, 0.45), size=0.6, angle=0.2)


def test_scores_of_right_and_wrong_images():
    prompts = evaluation_prompts(16)
    right = [_render(p) for p in prompts]
    scores = score_images(right, prompts)
    assert scores["background_accuracy"] == 1.0 and scores["colour_accuracy"] == 1.0
    assert scores["shape_accuracy"] == 1.0 and scores["silhouette_similarity"] > 0.85
    swapped = score_images([_render(p, swap=True) for p in prompts], prompts)
    assert swapped["background_accuracy"] == 0.0 and swapped["colour_accuracy"] == 0.0
    shifted = score_images(right[1:] + right[:1], prompts)  # every image shows the next prompt's shape
    assert shifted["shape_accuracy"] < 0.3 and shifted["silhouette_similarity"] < scores["silhouette_similarity"]
    with pytest.raises(ValueError):
        score_images(right[:3], prompts)


class _FakePipe:
    """Stands in for a StableDiffusionPipeline: draws what the prompt asks, or a fixed wrong image."""

    def __init__(self, obey: bool) -> None:
        self.obey, self.calls = obey, []

    def __call__(self, prompts, num_inference_steps, guidance_scale, generator, output_type):
        assert len(generator) == len(prompts) and output_type == "pil"
        self.calls.append((len(prompts), num_inference_steps, guidance_scale))
        if self.obey:
            images = [_render(p) for p in prompts]
        else:
            images = [draw_shape("circle", PALETTE["white"], PALETTE["black"]) for _ in prompts]
        return type("Output", (), {"images": images})()


def test_measure_pipeline_defaults_to_64_prompts_by_4_seeds():
    pipe = _FakePipe(obey=True)
    metrics = measure_pipeline(pipe, batch_size=32)
    assert metrics["images"] == 256 and metrics["prompts"] == 64 and metrics["seeds"] == 4
    assert pipe.calls == [(32, 25, 5.0)] * 8
    assert metrics["background_accuracy"] == 1.0 and metrics["colour_accuracy"] == 1.0 and metrics["shape_accuracy"] == 1.0


def test_measure_pipeline_scores_a_pipeline_that_ignores_prompts_low():
    metrics = measure_pipeline(_FakePipe(obey=False), evaluation_prompts(64), [0], steps=3)
    assert metrics["images"] == 64 and metrics["steps"] == 3
    assert metrics["background_accuracy"] == pytest.approx(8 / 64)  # one background in eight is black
    assert metrics["colour_accuracy"] < 0.2 and metrics["shape_accuracy"] < 0.3
